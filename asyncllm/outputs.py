"""What the engine hands back: finished requests, and the log-probabilities of tokens."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(slots=True)
class Logprob:
    """A token's log-probability under the model (log-softmax of the raw logits in float32, before penalties,
    logit_bias, min_tokens, temperature and top-k/top-p/min-p), and the `k` most likely tokens at its position
    (k = the request's `logprobs` / `prompt_logprobs`), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerateOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    logprobs: list[Logprob] | None = None  # one per output token (SamplingParams.logprobs set)
    # one per prompt token, the first None (SamplingParams.prompt_logprobs set)
    prompt_logprobs: list[Logprob | None] | None = None
