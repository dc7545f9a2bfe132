"""Linear layers for a few rows (decode steps of small batches): y [M, N] = x [M, K] @ W[N, K]^T (+ bias), M <= 16.

At such M a matmul is a read of W. cuBLAS does it poorly where the layer has few output tiles (Qwen3-0.6B's o,
1024 x 2048: 12.2 us at one row on the H200, 0.34 TB/s; this kernel 5.1), well on wide ones (where this kernel,
at most ~2.5 TB/s, loses): the layers choose (asyncllm.layers.linear.SKINNY_MAX_OUT). Each program reads a BLOCK_N
x (K / SPLIT_K) tile of W once, in BLOCK_K slices, into tensor-core dots against the rows of x (padded to
BLOCK_M = 16 with masked loads; M is not specialized, so one compiled variant serves every M).
SPLIT_K, fixed by the host from the shape (enough programs to fill the GPU), splits the reduction: each program
writes an fp32 partial and the last of a column block to arrive, told by an atomic counter, adds them in a fixed
order (deterministic) and writes the output: no second kernel. `swiglu=True` takes W = [gate | up] (2N rows) and
writes silu(gate) * up [M, N], rounded like the eager path (gate and up to x's dtype, silu to it, then the product).
Norms and the down projection's SwiGLU in its prologue or epilogue were tried and removed: asyncllm.layers.linear.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, prefetch_l2, wait_previous
from asyncllm_kernels.device_shape import device_shape

MAX_ROWS = 16  # BLOCK_M: rows of x one call takes
BLOCK_N = 16
BLOCK_K = 256
PROGRAMS_PER_SM = 4  # SPLIT_K's aim. Tile, split and launch options barely matter on the H200 (21 variants within
# 1%, f0276d3); a float32 dot costs the same as the bf16 one (329aec4): see tools/bench_skinny_linear.py
NUM_WARPS, NUM_STAGES = 4, 4
MAX_COUNTERS = 1 << 16  # column blocks one call may have
PREFETCH_K = 2 * BLOCK_K  # with PDL: columns of its slice of W a program asks into L2 before the wait (small models'
# whole slice: the split makes slices at least this long)


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Arrival counters, zero between calls (the merging program resets its own). Calls share them and must not
    overlap in time: every call of a device is on one stream (the engine's steps run on its side stream)."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


@triton.jit
def _round_out(acc, bias_ptr, n, n_mask, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc.to(dtype)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH_K: tl.constexpr, LINE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # this program's slice of the reduction
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    if PDL:  # the slice's first columns of W into L2 (no kernel writes weights) while the previous kernel finishes
        lines = k_start + tl.arange(0, PREFETCH_K // LINE) * LINE  # one address per cache line (LINE elements)
        first = w_ptr + tl.where(n_mask, n, 0)[:, None] * stride_wn + tl.minimum(lines, K - 1)[None, :]
        prefetch_l2(first)
        if SWIGLU:
            prefetch_l2(first + N * stride_wn)
    wait_previous(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        x_mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        w_tile = w_ptr + n[:, None] * stride_wn + k[None, :]
        w_mask = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_tile, mask=w_mask, other=0.0)
        if UPCAST:  # float32 operands (exact for half-precision values in TF32): the interpreter's bf16 dot is wrong
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if SWIGLU:  # the matching rows of up, N rows further down
            up = tl.load(w_tile + N * stride_wn, mask=w_mask, other=0.0)
            if UPCAST:
                up = up.to(tl.float32)
            acc_up += tl.dot(x, tl.trans(up), input_precision=PRECISION)
    dtype = y_ptr.dtype.element_ty
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        cols = 2 * N if SWIGLU else N
        part = part_ptr + m[:, None] * cols + n[None, :]  # partials [SPLIT_K, BLOCK_M, cols] fp32
        tl.store(part + pid_k * BLOCK_M * cols, acc, mask=out_mask)
        if SWIGLU:
            tl.store(part + pid_k * BLOCK_M * cols + N, acc_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partial stores are issued before the release below
        counter = count_ptr + pid_n
        last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:  # the last to arrive sums the partials in split order
            tl.debug_barrier()
            tl.store(counter, 0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(part + s * BLOCK_M * cols, mask=out_mask, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(part + s * BLOCK_M * cols + N, mask=out_mask, other=0.0, cache_modifier=".cg")
    else:
        last = True
    if last:
        out = y_ptr + m[:, None] * stride_ym + n[None, :]
        if SWIGLU:
            gate = _round_out(acc, bias_ptr, n, n_mask, HAS_BIAS, dtype).to(tl.float32)
            up = _round_out(acc_up, bias_ptr + N, n, n_mask, HAS_BIAS, dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            tl.store(out, (silu.to(tl.float32) * up).to(dtype), mask=out_mask)
        else:
            tl.store(out, _round_out(acc, bias_ptr, n, n_mask, HAS_BIAS, dtype), mask=out_mask)


def _split_k(blocks: int, k: int, device: torch.device) -> int:
    """Reduction slices: about PROGRAMS_PER_SM programs per SM over the grid, each at least two BLOCK_K slices long."""
    sms, _ = device_shape(device)
    return max(1, min(-(-PROGRAMS_PER_SM * sms // blocks), k // (2 * BLOCK_K)))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  swiglu: bool = False, pdl: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, rows contiguous), weight [N, K] (or [2N, K] with swiglu) -> [M, N]. `pdl`:
    launched with programmatic dependent launch (asyncllm_kernels.dependent_launch), the first PREFETCH_K columns
    of each program's slice of W asked into L2 before the wait."""
    rows, k = x.shape
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[1] == k
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    blocks = triton.cdiv(n, BLOCK_N)
    assert blocks <= MAX_COUNTERS
    split = _split_k(blocks * (2 if swiglu else 1), k, x.device)
    part = torch.empty(split, MAX_ROWS, 2 * n if swiglu else n, dtype=torch.float32, device=x.device) if split > 1 else y
    _skinny_kernel[(blocks, split)](
        x, weight, bias if bias is not None else y, y, part, _counters(x.device), rows, n, k, x.stride(0),
        weight.stride(0), y.stride(0), HAS_BIAS=bias is not None, SWIGLU=swiglu, SPLIT_K=split, BLOCK_M=MAX_ROWS,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=x.device.type == "cpu", PDL=pdl, PREFETCH_K=PREFETCH_K, LINE=128 // weight.element_size(),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, **launch_options(pdl))
    return y


def skinny_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      swiglu: bool = False) -> torch.Tensor:
    y = torch.nn.functional.linear(x, weight, bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y
