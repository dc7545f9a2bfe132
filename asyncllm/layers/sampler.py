"""Batched sampling: greedy, temperature, top-k, top-p, min-p, with per-request seeds.

All rows of a step are sampled together. A sampled token is argmax(probs / E) with E ~ Exponential(1) per vocab
entry (the exponential race, equivalent to drawing from probs). A request with a seed draws E from its own
generator, so its tokens do not depend on which other requests share the batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [B] float32; rows with 0 are greedy
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    min_p: torch.Tensor  # [B] float32; 0 = off
    seeded: list[tuple[int, torch.Generator]]  # (row, that request's own generator); other rows share one
    all_greedy: bool
    need_sort: bool  # some row uses top-k or top-p
    need_min_p: bool
    penalties: Penalties | None = None


@dataclass
class Penalties:
    """Repetition penalties of the rows that use them (others are unaffected)."""

    rows: torch.Tensor  # [P] int64 rows of the batch
    output_counts: torch.Tensor  # [P, V] float32: occurrences of each token in the output so far
    seen: torch.Tensor  # [P, V] bool: token is in the prompt or the output
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32
    repetition: torch.Tensor  # [P] float32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows = logits[self.rows]
        rep = self.repetition[:, None]
        rows = torch.where(self.seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
        rows = rows - self.frequency[:, None] * self.output_counts - self.presence[:, None] * (self.output_counts > 0)
        return logits.index_copy(0, self.rows, rows)


class Sampler:
    """`fused` (CUDA fast path): steps whose rows use only temperature (no top-k/top-p/min-p, no per-request seed)
    sample with one Triton Gumbel-max pass over the logits, keyed by a per-step seed drawn on the host."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.host_rng = random.Random(seed)
        self.fused = False

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """logits [B, V] (float32) -> token ids [B] int64."""
        if t.penalties is not None:
            logits = t.penalties.apply(logits)
        if t.all_greedy:
            return logits.argmax(dim=-1)
        if self.fused and not (t.need_sort or t.need_min_p or t.seeded):
            from asyncllm_kernels import gumbel_sample

            return gumbel_sample(logits, t.temperature, self.host_rng.getrandbits(62))
        greedy = logits.argmax(dim=-1)
        is_greedy = t.temperature == 0
        logits = logits / torch.where(is_greedy, 1.0, t.temperature)[:, None]
        if t.need_min_p:
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * t.min_p[:, None]
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        if t.need_sort:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            drop = (rank >= t.top_k[:, None]) & (t.top_k[:, None] > 0)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= t.top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        noise = self._exponential(probs, t.seeded)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled)

    def _exponential(self, probs: torch.Tensor, seeded: list[tuple[int, torch.Generator]]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, gen in seeded:
            noise[row].exponential_(generator=gen)
        return noise
