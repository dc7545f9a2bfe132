"""RMSNorm with an optional fused residual add: out = norm(x + residual) * w, and residual <- x + residual."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, wait_previous


@triton.jit
def add_norm_store(x, res_row, w_ptr, out_row, cols, mask, n_cols, eps, HAS_RESIDUAL: tl.constexpr):
    """One row: with HAS_RESIDUAL, x += residual (rounded in x's dtype, like an eager add) and stored back into the
    residual row; then out_row = w * norm(x). x: [BLOCK] in the activations' dtype."""
    if HAS_RESIDUAL:
        r = tl.load(res_row + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_row + cols, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=mask)


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_res, stride_out, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    wait_previous(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    add_norm_store(x, res_ptr + row * stride_res, w_ptr, out_ptr + row * stride_out, cols, mask, n_cols, eps,
                   HAS_RESIDUAL)


def norm_warps(block: int) -> int:
    """Warps for one row of `block` columns: 256 columns a warp, 1 to 8."""
    return min(max(block // 256, 1), 8)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pdl: bool = False) -> torch.Tensor:
    """x [T, H] -> normed [T, H]; with `residual` [T, H], residual is updated in place to x + residual first.
    `pdl`: launched with programmatic dependent launch (asyncllm_kernels.dependent_launch)."""
    assert x.ndim == 2 and x.stride(-1) == 1
    out = torch.empty_like(x)
    rows, cols = x.shape
    if rows == 0:
        return out
    block = triton.next_power_of_2(cols)
    res = residual if residual is not None else x
    _rmsnorm_kernel[(rows,)](x, res, weight, out, cols, x.stride(0), res.stride(0), out.stride(0), eps,
                             HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=norm_warps(block), PDL=pdl,
                             **launch_options(pdl))
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
