"""Sampling: per-row parameters kept on the device, one kernel for every row (asyncllm_kernels.sample).

A row of the sampler is a row of the block tables (`Request.row`): its temperature, top-k, top-p, min-p and
seed are written once when a request takes the row (`set_rows`), and each step gathers them by its rows, so the
sampling of a decode step has static shapes and runs inside its CUDA graph. Draws are keyed by (seed, position):
a request's tokens do not depend on the batch it shares. Repetition penalties are applied to the logits before,
on rank 0, from per-row token counts kept on the device (`PenaltyCounts`, `Penalties`): each step adds the tokens
its penalized rows sampled, so no step does work proportional to a request's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# the kernel's constants (asyncllm_kernels.sampling): lowbias32 multipliers, the column stride
M1, M2 = 0x7FEB352D, 0x846CA68B
GOLDEN = 0x9E3779B9
MASK32 = 0xFFFFFFFF


class PenaltyCounts:
    """Rank 0, per sampler row: occurrences of each token in the output, and whether it occurs in the prompt or the
    output, on the device. A row's counts are rebuilt from its request's known tokens when a penalized request
    first samples on it (`owner` says whose counts a row holds); from then on each step adds the tokens its
    penalized rows sampled (`Penalties.record`), including those still on their way to the host. Rows of requests
    without penalties are never written. Memory: rows x vocabulary x 5 bytes, allocated at start-up."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device) -> None:
        self.counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device)
        self.seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        self.owner: list[object | None] = [None] * num_rows  # host side: the request each row's counts belong to

    def rebuild(self, rows: torch.Tensor, output: torch.Tensor, known: torch.Tensor) -> None:
        """rows [Q]: reset them; output [N, 2] (row, token): one per output token; known [M, 2]: prompt and output
        tokens (duplicates allowed)."""
        self.counts.index_fill_(0, rows, 0)
        self.seen.index_fill_(0, rows, False)
        self.count(output[:, 0], output[:, 1], mark_seen=False)
        self.seen[known[:, 0], known[:, 1]] = True

    def count(self, rows: torch.Tensor, tokens: torch.Tensor, mark_seen: bool = True) -> None:
        """One more occurrence of tokens[i] in the output of row rows[i] (pairs may repeat)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        if mark_seen:
            self.seen[rows, tokens] = True


@dataclass
class PenaltyRebuild:
    """Rows whose counts a step rebuilds before applying penalties (see PenaltyCounts.rebuild)."""

    rows: torch.Tensor
    output: torch.Tensor
    known: torch.Tensor


@dataclass
class Penalties:
    """Repetition penalties of the sampled rows that use them (others are unaffected), from the device's counts."""

    state: PenaltyCounts
    rows: torch.Tensor  # [P] int64 rows of the step's sampled logits
    table_rows: torch.Tensor  # [P] int64 their sampler rows
    presence: torch.Tensor  # [P] float32
    frequency: torch.Tensor  # [P] float32
    repetition: torch.Tensor  # [P] float32
    rebuild: PenaltyRebuild | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """In place."""
        if self.rebuild is not None:
            r = self.rebuild
            self.state.rebuild(r.rows, r.output, r.known)
        counts = self.state.counts.index_select(0, self.table_rows).float()
        seen = self.state.seen.index_select(0, self.table_rows)
        rows = logits.index_select(0, self.rows).float()
        rep = self.repetition[:, None]
        rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
        rows = rows - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0)
        return logits.index_copy_(0, self.rows, rows.to(logits.dtype))

    def record(self, sampled: torch.Tensor) -> None:
        """After sampling (`sampled`: the step's ids by logit row): the new tokens count from the next step on."""
        self.state.count(self.table_rows, sampled.index_select(0, self.rows))


@dataclass
class LogitBias:
    """Additions to single logits of the sampled rows: `logit_bias`, and -inf for the tokens `min_tokens` still
    forbids (EOS, stop_token_ids)."""

    index: torch.Tensor  # [N, 2] int64: (row, token)
    value: torch.Tensor  # [N] float32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """In place."""
        return logits.index_put_((self.index[:, 0], self.index[:, 1]), self.value.to(logits.dtype), accumulate=True)


class Sampler:
    """`fused`: the Triton kernel (CUDA fast path); else its torch reference (CPU, the torch backend)."""

    def __init__(self, num_rows: int, device: torch.device, fused: bool) -> None:
        rows = num_rows + 1  # + the dummy row of padded graph steps: greedy
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.min_p = torch.zeros(rows, dtype=torch.float32, device=device)
        self.seed = torch.zeros(rows, dtype=torch.int64, device=device)
        self.fused = fused

    def set_rows(self, new: torch.Tensor) -> None:
        """new [P, 6] int64 on the device: row, temperature, top_k, top_p, min_p (float64 bits), seed."""
        rows = new[:, 0]
        floats = new[:, [1, 3, 4]].view(torch.float64).float()  # temperature, top_p, min_p
        self.temperature[rows] = floats[:, 0]
        self.top_k[rows] = new[:, 2]
        self.top_p[rows] = floats[:, 1]
        self.min_p[rows] = floats[:, 2]
        self.seed[rows] = new[:, 5]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                 out: torch.Tensor | None = None, position_offset: int = 0) -> torch.Tensor:
        """logits [B, V] -> token ids [B] int64; rows [B]: each logit row's sampler row; positions [B] (+
        position_offset): of the tokens being sampled (they key the draws)."""
        params = (self.temperature, self.top_k, self.top_p, self.min_p, self.seed)
        if self.fused:  # the kernel gathers each row's parameters itself
            from asyncllm_kernels import sample

            return sample(logits, *params, positions, out=out, rows=rows, position_offset=position_offset)
        sampled = sample_ref(logits, *(t.index_select(0, rows) for t in params), positions + position_offset)
        return sampled if out is None else out.copy_(sampled)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; the low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def uniform_ref(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] float32 in (0, 1): the kernel's noise."""
    key = _mix((seed & MASK32) ^ _mix(((seed >> 32) & MASK32) ^ _mix(position & MASK32)))
    cols = torch.arange(vocab, dtype=torch.int64, device=seed.device)
    h = _mix(key[:, None] ^ ((cols * GOLDEN) & MASK32)[None, :])
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)  # 23 bits: exact, strictly inside (0, 1)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               min_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """`asyncllm_kernels.sample` in torch: the same noise, the same thresholds (top-k and top-p keep every token
    tied with the last one they keep); the kernel finds thresholds by bisection, so a token within ~1e-5 of one
    may fall on the other side (and the GPU's exp and log round differently)."""
    x = logits.float()
    greedy = x.argmax(-1)
    if not bool((temperature > 0).any()):
        return greedy
    s = x / torch.where(temperature > 0, temperature, 1.0)[:, None]
    m = s.amax(-1, keepdim=True)
    floor = torch.where(min_p > 0, m.squeeze(-1) + torch.log(min_p.clamp_min(1e-30)), -math.inf)[:, None]
    s = s.masked_fill(s < floor, -math.inf)
    if bool(((top_k > 0) | (top_p < 1)).any()):  # thresholds: every token tied with the last one kept stays
        sorted_s = s.sort(-1, descending=True).values
        vocab = s.shape[-1]
        kth = sorted_s.gather(-1, (top_k.clamp(1, vocab) - 1)[:, None])
        probs = sorted_s.softmax(-1)
        # the first sorted token at which the cumulative probability reaches top_p
        last = ((probs.cumsum(-1) - probs) < top_p[:, None]).sum(-1, keepdim=True).clamp(1, vocab) - 1
        tau = torch.maximum(torch.where(top_k[:, None] > 0, kth, -math.inf),
                            torch.where(top_p[:, None] < 1, sorted_s.gather(-1, last), -math.inf))
        s = s.masked_fill(s < tau, -math.inf)
    score = s - torch.log(-torch.log(uniform_ref(seed, position, s.shape[-1])))
    return torch.where(temperature > 0, score.argmax(-1), greedy)
