"""Per-request sampling and stopping parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from asyncllm.errors import InvalidRequestError

# temperatures below this are greedy (dividing logits by less overflows float32 to inf/NaN)
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # each stop string is matched against the tail of the text every token
MAX_LOGPROBS = 20  # most likely tokens reported per position (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
MAX_TOP_K = 2**31 - 1  # a larger top_k keeps every token, as 0 does (it is stored in 64-bit step inputs)


@dataclass(frozen=True)
class StructuredOutputs:
    """Constrain the output to exactly one of: a JSON schema (`json`, a dict or its text), any JSON object
    (`json_object`), a regular expression, one of the strings in `choice`, or an EBNF grammar (GBNF, the
    `root` rule). Enforced by masking the logits with the grammar's allowed next tokens (engine/grammar.py)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        import json as json_module

        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json_module.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise InvalidRequestError("structured outputs take exactly one of json, json_object, regex, choice and "
                                      "grammar", "structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings", "structured_outputs")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or below 1e-5) means greedy. top_k 0 (or -1) disables top-k; top_p 1 and min_p 0 disable those filters.
    `max_tokens` None means "until the context (max_model_len) is full"; 0 computes the prompt only (with
    `prompt_logprobs`, for scoring) and ends with finish reason "length".
    `logprobs` / `prompt_logprobs` = k: each output / prompt token's log-probability and the k most likely tokens
    at its position (0: the token's own only; None: off), of the model's raw distribution (outputs.Logprob).
    `logit_bias` (token id -> value added to its logit, [-100, 100]) and `min_tokens` (EOS and stop_token_ids
    are masked until that many tokens exist) change the logits the token is drawn from, like the penalties.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # transformers/CTRL: tokens of prompt or output have logits divided (>0) or multiplied
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # Stop strings are matched by the incremental detokenizer of the async engine.
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):  # None (no stop strings / ids) and tuples are taken as lists
            value = getattr(self, name)
            if value is None or isinstance(value, tuple):
                setattr(self, name, list(value or ()))
        if self.top_k == -1 or (isinstance(self.top_k, int) and self.top_k > MAX_TOP_K):
            self.top_k = 0
        self.validate()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """The logits of this request's rows change before sampling (penalties, logit_bias, min_tokens, a grammar)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.structured_outputs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(msg: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param=param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {value!r}", name)
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), list):
                raise bad(f"{name} must be a list, got {getattr(self, name)!r}", name)
        if not self.temperature >= 0.0:
            raise bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            raise bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not self.repetition_penalty > 0.0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad(f"max_tokens must be a non-negative integer, got {self.max_tokens}", "max_tokens")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be a non-negative integer, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}", name)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise bad(f"structured_outputs must be a StructuredOutputs, got {self.structured_outputs!r}",
                      "structured_outputs")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise bad(f"logit_bias must map token ids to values, got {self.logit_bias!r}", "logit_bias")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries", "logit_bias")
            for t, v in self.logit_bias.items():
                if not isinstance(t, int) or t < 0 or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                    raise bad(f"logit_bias maps token ids (non-negative integers) to values in [-100, 100], "
                              f"got {t!r}: {v!r}", "logit_bias")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}", "seed")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers", "stop_token_ids")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop must be non-empty strings", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise bad(f"stop strings may have at most {MAX_STOP_STRING_CHARS} characters", "stop")
