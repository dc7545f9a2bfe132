"""What steps cost on the GPU, learned from the steps that ran, and the prompt-token limit that follows.

A step that prefills while requests decode makes every decoding request wait for its prompt tokens: one 2,048-token
chunk in a 64-row decode step of an 8B model stretches that step (an inter-token gap of 64 clients) from ~6.5 ms
to ~50 ms. So while requests decode, a step may take at most `limit` prompt tokens, sized to keep the step within
`max_slowdown` times a decode step:

    limit = (max_slowdown - 1) * decode_ms / ms_per_prompt_token

Both terms come from CUDA events around each step (ms). `decode_ms` starts as the time of the largest decode graph
replayed at start-up (the weights' read; cuda_graphs.py) and follows the steps without prompt tokens (moving
average). `ms_per_prompt_token` = average(step time - decode_ms) / average(prompt tokens) over the steps with both
prompt tokens and decode rows: what a step's prompt tokens add to it, so a fixed cost of such steps (attention run
outside the whole-step graph) counts against them and errs towards a smaller limit. For a small model the limit
ends above any step's budget; for a large one it is a few hundred tokens whatever its size (a decode step reads the
weights once, a prompt token costs their FLOPs). Without timings (CPU) there is no limit.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_LIMIT = 16  # prompt tokens: a step always makes some progress on the prompts
MIN_SAMPLES = 4  # steps with prompt tokens and decode rows seen before the limit holds


@dataclass
class StepCosts:
    max_slowdown: float  # 0: no limit
    decay: float = 0.05  # weight of each new step in the moving averages
    decode_ms: float = 0.0  # 0: not known
    num_samples: int = 0
    _extra_ms: float = 0.0  # moving averages over steps with prompt tokens and decode rows: step time - decode_ms,
    _prompt: float = 0.0  # and prompt tokens

    def observe(self, prompt_tokens: int, decode_rows: int, ms: float) -> None:
        """One step's GPU time; steps without decode rows (pure prefill) say nothing of the slowdown."""
        if ms <= 0 or not decode_rows:
            return
        a = self.decay
        if not prompt_tokens:
            self.decode_ms = ms if not self.decode_ms else self.decode_ms + a * (ms - self.decode_ms)
        elif self.decode_ms:
            a = max(a, 1 / (self.num_samples + 1))  # a plain mean over the first steps
            self._extra_ms += a * (ms - self.decode_ms - self._extra_ms)
            self._prompt += a * (prompt_tokens - self._prompt)
            self.num_samples += 1

    @property
    def ms_per_prompt_token(self) -> float:
        return max(self._extra_ms, 0.0) / self._prompt if self._prompt else 0.0

    def limit(self) -> int | None:
        """Most prompt tokens for a step with decode rows; None: no limit."""
        per_token = self.ms_per_prompt_token
        if self.max_slowdown <= 0 or self.num_samples < MIN_SAMPLES or not per_token:
            return None
        return max(MIN_LIMIT, int((self.max_slowdown - 1) * self.decode_ms / per_token))
