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
`norm=(w, eps)` puts the RMSNorm before the matmul into its prologue (x -> w * norm(x), rounded like
asyncllm_kernels.rms_norm), and `residual` the residual add before that (x -> x + residual): each program sums the
squares of its rows over all of K (a few KB from L2) before its slice, and the programs of the first column block
write x + residual, slice by slice, into a new tensor (never into `residual`, which other programs still read): one
kernel for what was a norm kernel and a matmul.
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
# With the norm in the prologue the x tile is worked in float32 (and the residual's beside it): at BLOCK_K 256 and 4
# stages a program takes 140 registers and 90 KB of shared memory (255 and 114 KB with SwiGLU), so 1-2 programs fit an
# SM where PROGRAMS_PER_SM are launched: the grid runs in waves. Narrower slices and fewer stages keep 4-8 resident
# (64-104 registers, 16-21 KB; `tools/compile_kernels.py` reports both, sm_90, no GPU needed). Timed at Qwen3-0.6B
# batch 1 (H100, 1b0d0b6): still slower than the norms apart (asyncllm.layers.linear.NORM_IN_MATMUL).
NORM_BLOCK_K, NORM_STAGES = 64, 3


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


@triton.jit
def _load_rows(x_ptr, res_ptr, m, k, mask, stride_xm, stride_rm, ADD_RESIDUAL: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] (+ the residual, rounded in x's dtype like an eager add)."""
    x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + m[:, None] * stride_rm + k[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, nw_ptr, res_ptr, res_out_ptr, eps, M, N, K,
                   stride_xm, stride_wn, stride_ym, stride_rm,
                   HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
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
    if NORM:  # each row's mean square over all of K, as the norm kernel rounds: of x (+ residual) in x's dtype
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xf = _load_rows(x_ptr, res_ptr, m, k, m_mask[:, None] & (k < K)[None, :], stride_xm, stride_rm,
                            ADD_RESIDUAL).to(tl.float32)
            squares += tl.sum(xf * xf, axis=1)
        rstd = tl.rsqrt(squares / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        x_mask = m_mask[:, None] & k_mask[None, :]
        x = _load_rows(x_ptr, res_ptr, m, k, x_mask, stride_xm, stride_rm, ADD_RESIDUAL)
        if ADD_RESIDUAL:
            if pid_n == 0:  # the first column block's programs write x + residual, each its own slice
                tl.store(res_out_ptr + m[:, None] * K + k[None, :], x, mask=x_mask)
        if NORM:
            nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            x = (nw[None, :] * (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)).to(x.dtype)
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


def _split_k(blocks: int, k: int, device: torch.device, block_k: int) -> int:
    """Reduction slices: about PROGRAMS_PER_SM programs per SM over the grid, each at least two block_k slices long."""
    sms, _ = device_shape(device)
    return max(1, min(-(-PROGRAMS_PER_SM * sms // blocks), k // (2 * block_k)))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  swiglu: bool = False, pdl: bool = False, norm: tuple[torch.Tensor, float] | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (M <= MAX_ROWS, rows contiguous), weight [N, K] (or [2N, K] with swiglu) -> [M, N]. `pdl`:
    launched with programmatic dependent launch (asyncllm_kernels.dependent_launch), the first PREFETCH_K columns
    of each program's slice of W asked into L2 before the wait. `norm` = (weight [K], eps): x is RMS-normed first;
    `residual` [M, K] (with `norm` only): x + residual is normed instead, and the call returns (y, x + residual)."""
    rows, k = x.shape
    assert rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[1] == k
    assert residual is None or (norm is not None and residual.shape == x.shape and residual.stride(-1) == 1)
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else y
    if rows == 0:
        return y if residual is None else (y, res_out)
    blocks = triton.cdiv(n, BLOCK_N)
    assert blocks <= MAX_COUNTERS
    block_k, stages = (NORM_BLOCK_K, NORM_STAGES) if norm is not None else (BLOCK_K, NUM_STAGES)
    split = _split_k(blocks * (2 if swiglu else 1), k, x.device, block_k)
    part = torch.empty(split, MAX_ROWS, 2 * n if swiglu else n, dtype=torch.float32, device=x.device) if split > 1 else y
    res = residual if residual is not None else x
    _skinny_kernel[(blocks, split)](
        x, weight, bias if bias is not None else y, y, part, _counters(x.device), norm[0] if norm else x, res, res_out,
        norm[1] if norm else 0.0, rows, n, k, x.stride(0), weight.stride(0), y.stride(0), res.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=swiglu, NORM=norm is not None, ADD_RESIDUAL=residual is not None,
        SPLIT_K=split, BLOCK_M=MAX_ROWS,
        BLOCK_N=BLOCK_N, BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=x.device.type == "cpu", PDL=pdl, PREFETCH_K=PREFETCH_K, LINE=128 // weight.element_size(),
        num_warps=NUM_WARPS, num_stages=stages, **launch_options(pdl))
    return y if residual is None else (y, res_out)


def skinny_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      swiglu: bool = False, norm: tuple[torch.Tensor, float] | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = residual = x + residual
    if norm is not None:
        from asyncllm_kernels.rmsnorm import rms_norm_ref

        x = rms_norm_ref(x, *norm)
    y = torch.nn.functional.linear(x, weight, bias)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y if residual is None else (y, residual)
