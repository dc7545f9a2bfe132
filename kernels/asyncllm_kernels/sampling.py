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

import functools

import torch
import triton
import triton.language as tl

# A token more than this far below the row's maximum (in scaled-logit units) has probability < e^-80 relative
# to it: the bisections search [m - SPAN, m].
SPAN = 80.0
BISECT_ITERS = 24  # SPAN / 2^24 ~ 5e-6: the width of a threshold's tie band
MAX_ROWS = 1 << 16  # logit rows one call may have (its arrival counters)


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


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Arrival counters of the draw's chunks, one per logit row, zero between calls (the merging program resets its
    own). Calls share them and must not overlap in time: every call of a device is on one stream."""
    return torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)


@triton.jit
def _param_row(rows_ptr, row, HAS_ROWS: tl.constexpr):
    """The row of the parameter tensors that logit row `row` reads (int64 either way: one return type)."""
    p = row.to(tl.int64)
    if HAS_ROWS:
        p = tl.load(rows_ptr + row).to(tl.int64)
    return p


@triton.jit
def _threshold_kernel(logits_ptr, stride, vocab, rows_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tau_ptr,
                      HAS_ROWS: tl.constexpr, SPAN_: tl.constexpr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row): the smallest scaled logit a token may have to be kept (-inf: no cut)."""
    row = tl.program_id(0)
    x_ptr = logits_ptr + row.to(tl.int64) * stride
    p = _param_row(rows_ptr, row, HAS_ROWS)
    t = tl.load(temp_ptr + p)
    min_p = tl.load(min_p_ptr + p)
    top_k = tl.load(top_k_ptr + p).to(tl.float32)
    top_p = tl.load(top_p_ptr + p)
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


@triton.jit(do_not_specialize=["pos_offset"])
def _draw_kernel(logits_ptr, stride, vocab, rows_ptr, temp_ptr, tau_ptr, seed_ptr, pos_ptr, pos_offset, best_ptr,
                 idx_ptr, count_ptr, out_ptr, HAS_ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNKS_BLOCK: tl.constexpr):
    """Program (row, chunk): the best score of CHUNK columns and its first column. Score: the logit (greedy
    rows), else s + Gumbel noise hashed from (seed, position, column) for kept tokens (s >= tau), else -inf. The
    last of a row's programs to arrive (an atomic counter) writes the column of the best chunk (the first on equal
    scores) into out."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    x_ptr = logits_ptr + row.to(tl.int64) * stride
    p = _param_row(rows_ptr, row, HAS_ROWS)
    t = tl.load(temp_ptr + p)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    tau = tl.load(tau_ptr + row)
    seed = tl.load(seed_ptr + p)
    pos = tl.load(pos_ptr + row) + pos_offset
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
    col = tl.min(tl.where(best == top, best_col, 2147483647), axis=0).to(tl.int64)
    chunks = tl.num_programs(1)
    if chunks == 1:
        tl.store(out_ptr + row, col)
    else:
        tl.store(best_ptr + row * chunks + chunk, top)
        tl.store(idx_ptr + row * chunks + chunk, col)
        tl.debug_barrier()  # the stores above are issued before the release below
        if tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu") == chunks - 1:
            tl.store(count_ptr + row, 0)
            c = tl.arange(0, CHUNKS_BLOCK)
            scores = tl.load(best_ptr + row * chunks + c, mask=c < chunks, other=-float("inf"), cache_modifier=".cg")
            cols = tl.load(idx_ptr + row * chunks + c, mask=c < chunks, other=0, cache_modifier=".cg")
            first = tl.min(tl.where(scores == tl.max(scores, axis=0), c, CHUNKS_BLOCK), axis=0)
            tl.store(out_ptr + row, tl.sum(tl.where(c == first, cols, 0), axis=0))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, position: torch.Tensor, out: torch.Tensor | None = None,
           chunk: int = 4096, rows: torch.Tensor | None = None, position_offset: int = 0) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride over V); per row: temperature float32 (0 = greedy), top_k int64
    (0 = off), top_p float32 (1 = off), min_p float32 (0 = off), seed int64, position int64 (of the token being
    sampled, less `position_offset`) -> token ids [B] int64 (written into `out` when given). With `rows` [B] int64,
    logit row b takes the parameters (all but position) at rows[b] of those tensors instead of b. Two kernels: each
    row's threshold (only rows with a cut do work), then the draw over chunks of the vocabulary in parallel (batch 1
    fills the GPU too); the best chunk of each row wins (the first on equal scores)."""
    assert logits.ndim == 2 and logits.stride(-1) == 1
    n, vocab = logits.shape
    assert n <= MAX_ROWS and (rows is None or rows.shape == (n,)) and (out is None or out.is_contiguous())
    if out is None:
        out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    block = min(1024, triton.next_power_of_2(vocab), triton.next_power_of_2(chunk))
    chunk = max(block, min(chunk, triton.next_power_of_2(vocab)))
    chunks = triton.cdiv(vocab, chunk)
    tau = torch.empty(n, dtype=torch.float32, device=logits.device)
    best = torch.empty(n, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n, chunks, dtype=torch.int64, device=logits.device)
    has_rows = rows is not None
    _threshold_kernel[(n,)](logits, logits.stride(0), vocab, rows if has_rows else tau, temperature, top_k, top_p,
                            min_p, tau, HAS_ROWS=has_rows, SPAN_=SPAN, ITERS=BISECT_ITERS, BLOCK=block, num_warps=8)
    _draw_kernel[(n, chunks)](logits, logits.stride(0), vocab, rows if has_rows else tau, temperature, tau, seed,
                              position, position_offset, best, idx, _counters(logits.device), out, HAS_ROWS=has_rows,
                              CHUNK=chunk, BLOCK=block, CHUNKS_BLOCK=triton.next_power_of_2(chunks), num_warps=8)
    return out
