"""SwiGLU activation: x [T, 2H] (gate | up) -> silu(gate) * up [T, H] in one kernel, rounded like the eager
F.silu(gate) * up (silu rounded to the input dtype, then the product)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, wait_previous


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < n_cols
    wait_previous(PDL)
    gate = tl.load(x_ptr + t * stride_x + i, mask=m, other=0.0)
    up = tl.load(x_ptr + t * stride_x + n_cols + i, mask=m, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + t * stride_out + i, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=m)


def silu_and_mul(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """`pdl`: launched with programmatic dependent launch (asyncllm_kernels.dependent_launch)."""
    assert x.ndim == 2 and x.stride(-1) == 1 and x.shape[1] % 2 == 0
    tokens, cols = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, cols, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = min(triton.next_power_of_2(cols), 2048)
    _silu_and_mul_kernel[(tokens, triton.cdiv(cols, block))](x, out, cols, x.stride(0), out.stride(0), BLOCK=block,
                                                             num_warps=4, PDL=pdl, **launch_options(pdl))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
