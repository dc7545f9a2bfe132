"""Tensor parallelism: all-reduce + residual add + RMSNorm in one kernel, for the small inputs of decode steps.

x [T, H] is this rank's partial sum of a row-parallel matmul; out = norm(sum over ranks of x + residual) * w and
residual <- sum + residual, on every rank alike. One-shot over NVLink: each rank stages its x in an exchange buffer
that every peer can read (torch symmetric memory; the caller passes each rank's buffer address), program p of every
rank meets program p of the others at a barrier of flags in peer-visible signal pads, then sums the T rows it owns
from all ranks' buffers in rank order (float32, rounded once: identical bits on every rank) and normalises them.

Invariants the caller keeps:
- Signal pads are zero between calls (each wait resets the flag it consumed); a pad holds MAX_PROGRAMS * world int32.
- Two calls in a row on the stream use different exchange slots (`offset`): a peer may still read this rank's slot
  of the previous call, never the one before it, since it has arrived at the previous call's barrier only after
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
def _barrier(signal_ptrs, pid, rank, WORLD: tl.constexpr):
    """Program `pid` of every rank meets here. Flag [pid, r] of rank p's pad: rank r has arrived (its stores
    before this point are visible to p). Release when raising a peer's flag, acquire when taking one's own."""
    for p in tl.static_range(WORLD):
        pad = tl.load(signal_ptrs + p).to(tl.pointer_type(tl.int32))
        # the peer may not yet have taken this flag from the previous call: wait until it is down
        while tl.atomic_cas(pad + pid * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
            pass
    own = tl.load(signal_ptrs + rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        while tl.atomic_cas(own + pid * WORLD + p, 1, 0, sem="acquire", scope="sys") != 1:
            pass


@triton.jit
def _all_reduce_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, buffer_ptrs, signal_ptrs, offset, rows, n_cols,
                            stride_x, stride_res, stride_out, eps, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = x_ptr.dtype.element_ty
    own = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)) + offset
    for row in range(pid, rows, programs):  # stage this program's rows where the peers read them
        tl.store(own + row * n_cols + cols, tl.load(x_ptr + row * stride_x + cols, mask=mask), mask=mask)
    tl.debug_barrier()  # every thread's stores precede the release of the arrival flags
    _barrier(signal_ptrs, pid, rank, WORLD)
    tl.debug_barrier()  # and the acquire precedes every thread's loads
    for row in range(pid, rows, programs):
        acc = tl.zeros([BLOCK], tl.float32)
        for p in tl.static_range(WORLD):
            peer = tl.load(buffer_ptrs + p).to(tl.pointer_type(dtype)) + offset
            acc += tl.load(peer + row * n_cols + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
        add_norm_store(acc.to(dtype), res_ptr + row * stride_res, w_ptr, out_ptr + row * stride_out, cols, mask,
                       n_cols, eps, True)


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            buffer_ptrs: torch.Tensor, signal_ptrs: torch.Tensor, offset: int, rank: int) -> torch.Tensor:
    """x, residual [T, H] -> norm(all-reduced x + residual) [T, H]; residual updated in place. buffer_ptrs /
    signal_ptrs: int64 [world] on the device, every rank's exchange buffer (x's dtype, at least offset + T * H
    elements) and signal pad addresses; `offset`: this call's exchange slot (see the module's invariants)."""
    assert x.ndim == 2 and x.stride(-1) == 1 and residual.stride(-1) == 1 and residual.dtype == x.dtype
    out = torch.empty_like(x)
    rows, cols = x.shape
    if rows == 0:
        return out
    block = triton.next_power_of_2(cols)
    _all_reduce_norm_kernel[(min(rows, MAX_PROGRAMS),)](
        x, residual, weight, out, buffer_ptrs, signal_ptrs, offset, rows, cols, x.stride(0), residual.stride(0),
        out.stride(0), eps, rank, WORLD=buffer_ptrs.numel(), BLOCK=block, num_warps=norm_warps(block))
    return out
