"""A request's life inside the engine (pure Python, no torch)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any
from asyncllm.outputs import Logprob
from asyncllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what fits in max_model_len
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float = 0.0  # time.monotonic() at its first admission (0: not admitted yet)
    token_ids: list[int] = field(init=False)  # prompt + output so far
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or scheduled into it)
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission (-1: not admitted yet)
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    # Device-resident step state (step_inputs.py): the request's row of the block tables and sampling
    # parameters while it runs (-1 otherwise), how many of its blocks the device tables hold, its draws' seed.
    row: int = -1
    num_synced_blocks: int = 0
    sample_seed: int | None = None
    # Overlap scheduling: tokens already sampled on the device but not yet appended to token_ids (0, 1, or 2
    # for a moment), and the row of the newest of them in its step's sampled-ids tensor (the next step's input).
    num_pending: int = 0
    pending_row: int = -1
    # log-probabilities (params.logprobs / prompt_logprobs set, else None): one per output token appended, and
    # one per prompt token (the first None) filled in as the prefill's chunks run
    output_logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    # structured outputs: the grammar matcher (engine/grammar.py; never replaced), advanced by each sampled token in
    # the step thread or the grammar workers, never used elsewhere; its stop tokens (sampled only once the grammar is
    # complete: one ends it, grammar_ended); grammar_refused: it refused a token, which the mask should make impossible
    grammar: Any = None
    grammar_handle: int = 0  # its tvm-ffi object's address (native grammar work: engine/native_grammar.py)
    grammar_stops: frozenset[int] = frozenset()
    grammar_ended: bool = False
    grammar_refused: bool = False
    # derived from the above in __post_init__
    num_prompt_tokens: int = field(init=False)
    penalized: bool = field(init=False)
    biased: bool = field(init=False)
    reports_logprobs: bool = field(init=False)
    extras: bool = field(init=False)
    stop_ids: frozenset[int] = field(init=False)
    max_total_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        p = self.params
        if p.logprobs is not None:
            self.output_logprobs = []
        if p.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        # what the runner does for this row beyond the sampler's parameters (flags checked per row and step)
        self.penalized = p.has_penalties
        self.biased = bool(p.logit_bias) or p.min_tokens > 0
        self.reports_logprobs = p.logprobs is not None or p.prompt_logprobs is not None
        self.extras = p.adjusts_logits or self.reports_logprobs
        # tokens that end it with "stop" when sampled: its stop_token_ids, and EOS unless ignore_eos
        self.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        # its length limit in tokens (prompt + output): max_tokens; the scheduler also stops at max_model_len
        self.max_total_tokens = self.num_prompt_tokens + self.max_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt log-probabilities still to compute: the prefix cache must not skip those positions."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Known tokens plus the ones the device has sampled but the host has not seen yet."""
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
