"""Tensor parallelism: all-reduce + residual add + RMSNorm in one kernel, for the small inputs of decode steps.

x [T, H] is this rank's partial sum of a row-parallel matmul; out = norm(sum over ranks of x + residual) * w and
residual <- sum + residual, on every rank alike. One-shot push over NVLink: every rank has an exchange buffer and a
signal pad that its peers can write (torch symmetric memory; the caller passes every rank's addresses). Program p
of each rank writes its rows of x into part `rank` of every rank's buffer, raises its flag in every rank's pad, waits
for the flags of program p of all ranks, then sums the parts in its own buffer in rank order (float32, rounded once:
identical bits on every rank) and normalises. Remote stores are posted, so a call costs about one NVLink latency.

Flags count calls: flag [p, r] of a pad holds the last call number program p of rank r has arrived at (it writes
its own pad's too, which is where it reads its count from), so nothing is reset; a peer is at most one call ahead.
Invariants the caller keeps:
- Pads start zeroed and hold MAX_PROGRAMS * world int32; every rank makes the same calls with the same shapes.
- Two calls in a row on the stream use different exchange slots (`offset`): a peer may still read the parts of the
  previous call, never those of the one before it, since it has arrived at the previous call's barrier only after
  finishing the call before (one barrier per call, double-buffered).
A peer that never arrives leaves the kernel spinning: like NCCL's, it relies on the job's watchdog.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm_kernels.rmsnorm import add_norm_store, norm_warps

MAX_PROGRAMS = 128  # programs per call (each loops over its rows): a signal pad holds MAX_PROGRAMS * world flags


@triton.jit
def _barrier(signal_ptrs, pid, rank, WORLD: tl.constexpr, WORLD_PAD: tl.constexpr):
    """Program `pid` of every rank meets here; its stores before are visible to every rank after (release when
    raising a flag, acquire when reading them). Serial-number arithmetic: counts may wrap around."""
    r = tl.arange(0, WORLD_PAD)
    live = r < WORLD
    own = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int32)) + pid * WORLD
    call = tl.load(own + rank, volatile=True) + 1
    pads = tl.load(signal_ptrs + r, mask=live, other=0).to(tl.pointer_type(tl.int32)) + pid * WORLD
    tl.atomic_xchg(pads + rank, tl.full([WORLD_PAD], 0, tl.int32) + call, mask=live, sem="release", scope="sys")
    pending = 1
    while pending > 0:
        seen = tl.atomic_add(own + r, 0, mask=live, sem="acquire", scope="sys")
        pending = tl.sum(tl.where(live & (seen - call < 0), 1, 0))


@triton.jit
def _all_reduce_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, buffer_ptrs, signal_ptrs, offset, part, rows, n_cols,
                            stride_x, stride_res, stride_out, eps, rank, WORLD: tl.constexpr,
                            WORLD_PAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    for row in range(pid, rows, programs):  # this program's rows into part `rank` of every rank's buffer
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask)
        for p in tl.static_range(WORLD):
            dst = tl.load(buffer_ptrs + p).to(tl.pointer_type(dtype)) + offset + rank * part
            tl.store(dst + row * n_cols + cols, x, mask=mask)
    tl.debug_barrier()  # every thread's stores precede the release of the flags
    _barrier(signal_ptrs, pid, rank, WORLD, WORLD_PAD)
    tl.debug_barrier()  # and the acquire precedes every thread's loads
    own = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)) + offset
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(WORLD):
            acc += tl.load(own + p * part + row * n_cols + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
        add_norm_store(acc.to(dtype), res_ptr + row * stride_res, w_ptr, out_ptr + row * stride_out, cols, mask,
                       n_cols, eps, True)


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            buffer_ptrs: torch.Tensor, signal_ptrs: torch.Tensor, offset: int, part: int,
                            rank: int) -> torch.Tensor:
    """x, residual [T, H] -> norm(all-reduced x + residual) [T, H]; residual updated in place. buffer_ptrs /
    signal_ptrs: int64 [world] on the device, every rank's exchange buffer (x's dtype) and signal pad addresses.
    This call's exchange slot starts `offset` elements into each buffer and holds world parts of `part` >= T * H
    elements (see the module's invariants)."""
    assert x.ndim == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1 and residual.dtype == x.dtype
    out = torch.empty_like(x)
    rows, cols = x.shape
    assert rows * cols <= part
    if rows == 0:
        return out
    block, world = triton.next_power_of_2(cols), buffer_ptrs.numel()
    _all_reduce_norm_kernel[(min(rows, MAX_PROGRAMS),)](
        x, residual, weight, out, buffer_ptrs, signal_ptrs, offset, part, rows, cols, x.stride(0),
        residual.stride(0), out.stride(0), eps, rank, WORLD=world, WORLD_PAD=triton.next_power_of_2(world),
        BLOCK=block, num_warps=norm_warps(block))
    return out
