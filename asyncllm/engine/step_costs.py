"""What steps cost on the GPU, learned from the steps that ran, and the prompt-token limit that follows.

A step that prefills while requests decode makes every decoding request wait for its prompt tokens: one 2,048-token
chunk in a 64-row decode step of an 8B model stretches that step (an inter-token gap of 64 clients) from ~6.5 ms
to ~50 ms. So while requests decode, a step may take at most `limit` prompt tokens, sized so that the step takes at
most `max_slowdown` decode steps' time:

    limit = ((max_slowdown - 1) * decode_ms - fixed_ms) / ms_per_prompt_token

All terms come from CUDA events around each step (ms). `decode_ms` starts as the time of the largest decode graph
replayed at start-up (the weights' read; cuda_graphs.py) and follows the steps without prompt tokens (moving
average). A step with prompt tokens and decode rows costs `decode_ms + fixed_ms + ms_per_prompt_token * P`: the
slope and the intercept of step time over prompt tokens P among such steps (exponentially weighted least squares);
`fixed_ms` (intercept minus `decode_ms`, at least 0) is what any step with prompt tokens costs more (attention
outside the whole-step graph, planning, host launches). Until such steps are seen (MIN_SAMPLES of them, with
prompt-token counts that vary: an opening burst's full chunks alone cannot give a slope) the slope is the piecewise
graphs' GPU time per token, timed at start-up (piecewise_graphs.py), so the limit holds from the first step.
The slope, not the average cost per token: averaged over its tokens the fixed cost would make small steps look
dear, shrink the limit, make steps smaller still, and so on down to nothing. For the same reason the fixed cost
takes at most half of the allowance: where it alone would break the budget, fewer and larger chunks cost the
decoding requests less than many small ones each paying it.
For a small model the limit ends above any step's budget; for a large one it is a few hundred tokens whatever its
size (a decode step reads the weights once, a prompt token costs their FLOPs). Without timings (CPU) there is no limit.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_LIMIT = 16  # prompt tokens: a step always makes some progress on the prompts
MIN_SAMPLES = 8  # steps with prompt tokens and decode rows seen before the slope is trusted
MIN_SPREAD = 0.05  # the prompt tokens' standard deviation, relative to their mean, that a new slope needs


@dataclass
class StepCosts:
    max_slowdown: float  # 0: no limit
    decay: float = 0.02  # weight of each new step in the moving averages
    decode_ms: float = 0.0  # 0: not known
    ms_per_prompt_token: float = 0.0  # 0: not known (yet, or not positive)
    num_samples: int = 0
    # exponentially weighted sums over steps with prompt tokens and decode rows: weight, P, P^2, ms, P*ms
    _w: float = 0.0
    _p: float = 0.0
    _pp: float = 0.0
    _m: float = 0.0
    _pm: float = 0.0

    def observe(self, prompt_tokens: int, decode_rows: int, ms: float) -> None:
        """One step's GPU time; steps without decode rows (pure prefill) say nothing of the slowdown."""
        if ms <= 0 or not decode_rows:
            return
        a = self.decay
        if not prompt_tokens:
            self.decode_ms = ms if not self.decode_ms else self.decode_ms + a * (ms - self.decode_ms)
            return
        k, p = 1 - a, float(prompt_tokens)
        self._w, self._p, self._pp = k * self._w + a, k * self._p + a * p, k * self._pp + a * p * p
        self._m, self._pm = k * self._m + a * ms, k * self._pm + a * p * ms
        self.num_samples += 1
        mean_p = self._p / self._w
        var = self._pp / self._w - mean_p * mean_p
        if self.num_samples >= MIN_SAMPLES and var > (MIN_SPREAD * mean_p) ** 2:  # else keep the last slope
            self.ms_per_prompt_token = max((self._pm / self._w - mean_p * self._m / self._w) / var, 0.0)

    @property
    def fixed_ms(self) -> float:
        """What a step with prompt tokens costs beyond a decode step and its tokens' slope (0: not known)."""
        if not self.ms_per_prompt_token or not self.decode_ms or not self._w:
            return 0.0
        intercept = (self._m - self.ms_per_prompt_token * self._p) / self._w
        return max(intercept - self.decode_ms, 0.0)

    def limit(self) -> int | None:
        """Most prompt tokens for a step with decode rows; None: no limit."""
        if self.max_slowdown <= 0 or not self.decode_ms or not self.ms_per_prompt_token:
            return None
        allowance = (self.max_slowdown - 1) * self.decode_ms
        room = max(allowance - self.fixed_ms, allowance / 2)
        return max(MIN_LIMIT, int(room / self.ms_per_prompt_token))
