"""Sampling of a step's rows in one kernel: greedy, temperature, min-p, top-k, top-p, per-request seeds.

Rows are independent and the kernel has no data-dependent shapes, so it runs inside a CUDA graph. Row r samples
token = argmax over kept v of (logit[v] / T + G[v]) with G = -log(-log(U)) (Gumbel-max: an exact draw from the
kept tokens' softmax) and U a uniform number hashed from (the request's seed, the position of the token being
sampled, v). The draws of a request therefore depend on its seed and its own positions only: not on the batch it
shares, nor on how often the step ran (a preempted request redraws the same tokens). Rows with T == 0 take the
plain argmax (the first index among equal maxima).

Kept tokens (scaled logits s = logit / T, m = max s): s >= m + ln(min_p) when min_p > 0; the top_k largest when
top_k > 0; the smallest set of largest tokens whose probability (among the min-p survivors) reaches top_p when
top_p < 1. Top-k and top-p thresholds are found by bisection over s (each iteration one pass over the row), not by
sorting; tokens within ~1e-5 of a threshold count as ties and may stay in. `asyncllm.layers.sampler.sample_ref`
is the same computation in torch (the CPU path and the kernel's test), with a sort for top-k/top-p.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A token more than this far below the row's maximum (in scaled-logit units) has probability < e^-80 relative
# to it: the bisections search [m - SPAN, m].
SPAN = 80.0
BISECT_ITERS = 24  # SPAN / 2^24 ~ 5e-6: the width of a threshold's tie band


@triton.jit
def _mix(x):
    """lowbias32, a 32-bit integer hash (x is uint32); asyncllm.layers.sampler._mix is the same in torch."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _count_mass(x_ptr, vocab, inv_t, m, floor, tau, BLOCK: tl.constexpr):
    """(tokens with s >= tau, their unnormalised probability) among tokens with s >= floor."""
    count = tl.zeros([BLOCK], dtype=tl.float32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        s = tl.load(x_ptr + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32) * inv_t
        keep = (s >= tau) & (s >= floor)
        count += keep.to(tl.float32)
        mass += tl.where(keep, tl.exp(s - m), 0.0)
    return tl.sum(count, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _threshold_kernel(logits_ptr, stride, vocab, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tau_ptr,
                      SPAN_: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row): the smallest scaled logit a token may have to be kept (-inf: no cut)."""
    row = tl.program_id(0)
    x_ptr = logits_ptr + row.to(tl.int64) * stride
    t = tl.load(temp_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.float32)
    top_p = tl.load(top_p_ptr + row)
    tau = -float("inf")
    if (t > 0.0) & ((min_p > 0.0) | (top_k > 0.0) | (top_p < 1.0)):
        inv_t = 1.0 / t
        best = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            best = tl.maximum(best, tl.load(x_ptr + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32))
        m = tl.max(best, axis=0) * inv_t
        floor = tl.where(min_p > 0.0, m + tl.log(tl.maximum(min_p, 1e-30)), -float("inf"))
        tau = floor
        if top_k > 0.0:  # largest tau with count(s >= tau) >= top_k
            lo = m - SPAN_
            hi = m + 1.0
            for _ in range(ITERS):
                mid = 0.5 * (lo + hi)
                count, _mass = _count_mass(x_ptr, vocab, inv_t, m, floor, mid, BLOCK)
                ok = count >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            tau = tl.maximum(tau, lo)
        if top_p < 1.0:  # largest tau whose tokens hold >= top_p of the min-p survivors' probability
            _count, total = _count_mass(x_ptr, vocab, inv_t, m, floor, -float("inf"), BLOCK)
            lo = m - SPAN_
            hi = m + 1.0
            for _ in range(ITERS):
                mid = 0.5 * (lo + hi)
                _count, mass = _count_mass(x_ptr, vocab, inv_t, m, floor, mid, BLOCK)
                ok = mass >= top_p * total
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            tau = tl.maximum(tau, lo)
    tl.store(tau_ptr + row, tau)


@triton.jit
def _draw_kernel(logits_ptr, stride, vocab, temp_ptr, tau_ptr, seed_ptr, pos_ptr, best_ptr, idx_ptr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the best score of CHUNK columns and its first column. Score: the logit (greedy
    rows), else s + Gumbel noise hashed from (seed, position, column) for kept tokens (s >= tau), else -inf."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    x_ptr = logits_ptr + row.to(tl.int64) * stride
    t = tl.load(temp_ptr + row)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    tau = tl.load(tau_ptr + row)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    key = _mix((seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
                                                       ^ _mix((pos & 0xFFFFFFFF).to(tl.uint32))))
    best = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        if greedy:
            score = x
        else:
            s = x * inv_t
            h = _mix(key ^ (cols.to(tl.uint32) * 0x9E3779B9))
            # 23 bits: (k + 0.5) / 2^23 is exact in float32 and strictly inside (0, 1); with 24 bits the largest
            # value rounds to 1.0, whose noise is +inf (that token wins whatever its logit)
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            score = tl.where((s >= tau) & (cols < vocab), s - tl.log(-tl.log(u)), -float("inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    top = tl.max(best, axis=0)
    out = row * tl.num_programs(1) + chunk
    tl.store(best_ptr + out, top)
    tl.store(idx_ptr + out, tl.min(tl.where(best == top, best_col, 2147483647), axis=0).to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, out: torch.Tensor | None = None,
           chunk: int = 4096) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride over V); per row: temperature float32 (0 = greedy), top_k int64
    (0 = off), top_p float32 (1 = off), min_p float32 (0 = off), seed int64, position int64 (of the token being
    sampled) -> token ids [B] int64 (written into `out` when given). Two kernels: each row's threshold (only rows
    with a cut do work), then the draw over chunks of the vocabulary in parallel (batch 1 fills the GPU too); the
    best chunk of each row wins (the first on equal scores)."""
    assert logits.ndim == 2 and logits.stride(-1) == 1
    rows, vocab = logits.shape
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(vocab), triton.next_power_of_2(chunk))
    chunk = max(block, min(chunk, triton.next_power_of_2(vocab)))
    chunks = triton.cdiv(vocab, chunk)
    tau = torch.empty(rows, dtype=torch.float32, device=logits.device)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int64, device=logits.device)
    _threshold_kernel[(rows,)](logits, logits.stride(0), vocab, temperature, top_k, top_p, min_p, tau,
                               SPAN_=SPAN, ITERS=BISECT_ITERS, BLOCK=block, num_warps=8)
    _draw_kernel[(rows, chunks)](logits, logits.stride(0), vocab, temperature, tau, seed, position, best, idx,
                                 CHUNK=chunk, BLOCK=block, num_warps=8)
    return torch.gather(idx, 1, best.argmax(1, keepdim=True), out=out.view(rows, 1)).view(rows)
