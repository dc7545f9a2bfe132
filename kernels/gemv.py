"""Skinny matmul for decode: y [M, N] = x [M, K] @ W[N, K]^T (+ bias) for M <= MAX_ROWS rows, one kernel.

At M = 1 a matmul streams its weight once and does almost no arithmetic; cuBLAS then often splits K over
several CTAs and adds a second, reduce kernel. Here each program owns BLOCK_N output columns over the whole of K
(no reduce kernel); BLOCK_N is chosen so that the grid has about two programs per SM. Accumulation in float32,
output rounded once to x's dtype.

`silu_mul=True` fuses the SwiGLU activation into the load of x: x is then [M, 2K] = gate | up and the matmul
reads silu(gate) * up, each rounded to x's dtype as eager silu() and mul would store them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 4  # the kernel's limit; the engine uses it for one row only (measured: cuBLAS wins at 2..4)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                 M: tl.constexpr, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # each weight tile is loaded once and serves every row of x
        k = k0 + kk
        k_mask = k < K
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        for r in tl.static_range(M):
            x = tl.load(x_ptr + r * stride_xm + k, mask=k_mask, other=0.0)
            if SILU_MUL:
                up = tl.load(x_ptr + r * stride_xm + K + k, mask=k_mask, other=0.0).to(tl.float32)
                g = x.to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty)  # rounded as eager silu() stores it
                x = (act.to(tl.float32) * up).to(x_ptr.dtype.element_ty)
            part = tl.sum(w * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where(m[:, None] == r, part[None, :], 0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         tile: int = 8192, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] (or [M, 2K] gate|up with `silu_mul`), weight [N, K] row-major -> [M, N] in x's dtype."""
    rows, n_out, k = x.shape[0], weight.shape[0], weight.shape[1]
    assert 1 <= rows <= MAX_ROWS and weight.stride(1) == 1 and x.stride(-1) == 1
    assert x.shape[1] == (2 * k if silu_mul else k), (tuple(x.shape), tuple(weight.shape))
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    # the widest column block (<= 16) that still gives about two programs per SM; `tile` weights per K step
    sms = _num_sms(x.device)
    block_n = 16
    while block_n > 1 and triton.cdiv(n_out, block_n) < 2 * sms:
        block_n //= 2
    m_pad = triton.next_power_of_2(rows)
    block_k = min(triton.next_power_of_2(k), max(32, tile // block_n))
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else weight, y, n_out, k, x.stride(0), weight.stride(0), y.stride(0),
        M=rows, M_PAD=m_pad, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps)
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate.float()).mul(up.float()).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
