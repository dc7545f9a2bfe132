"""Per-request sampling and stopping parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncllm.errors import InvalidRequestError

# temperatures below this are greedy (dividing logits by less overflows float32 to inf/NaN)
GREEDY_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # each stop string is matched against the tail of the text every token


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 (or below 1e-5) means greedy. top_k 0 (or -1) disables top-k; top_p 1 and min_p 0 disable those filters.
    `max_tokens` None means "until the context (max_model_len) is full".
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        def bad(msg: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(msg, param=param)

        if not self.temperature >= 0.0:
            raise bad(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k}", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not self.repetition_penalty > 0.0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
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
