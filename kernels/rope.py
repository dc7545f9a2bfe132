"""Rotary embedding applied in place to q [T, Hq, D] and k [T, Hk, D] (rotate-half layout), from a float32
cos/sin cache [max_position, D] (cos in the first half, sin in the second) indexed by positions [T]. Any rope
scaling (Llama-3, linear, yarn) is baked into the cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(p, m, cos, sin, HALF: tl.constexpr):
    x1 = tl.load(p, mask=m, other=0.0)
    x2 = tl.load(p + HALF, mask=m, other=0.0)
    dt = x1.dtype
    # cos/sin rounded to the activations' dtype like transformers; products in float32, rounded once
    c, s = cos.to(dt).to(tl.float32), sin.to(dt).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p, (x1f * c - x2f * s).to(dt), mask=m)
    tl.store(p + HALF, (x2f * c + x1f * s).to(dt), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cache_ptr, pos_ptr, n_q_heads, n_k_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * 2 * HALF + d)[None, :]
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + d)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    for start in range(0, n_q_heads, BLOCK_H):
        m = (start + h) < n_q_heads
        p = q_ptr + t * stride_qt + (start + h) * stride_qh + d[None, :]
        _rotate(p, m, cos, sin, HALF)
    for start in range(0, n_k_heads, BLOCK_H):
        m = (start + h) < n_k_heads
        p = k_ptr + t * stride_kt + (start + h) * stride_kh + d[None, :]
        _rotate(p, m, cos, sin, HALF)


def rope_inplace(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    tokens, n_q, dim = q.shape
    assert dim % 2 == 0 and triton.next_power_of_2(dim // 2) == dim // 2 and q.stride(-1) == 1 and k.stride(-1) == 1
    if tokens == 0:
        return
    _rope_kernel[(tokens,)](q, k, cos_sin_cache, positions, n_q, k.shape[1], q.stride(0), q.stride(1), k.stride(0),
                            k.stride(1), HALF=dim // 2, BLOCK_H=min(triton.next_power_of_2(max(n_q, k.shape[1])), 16))


def rope_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rot(q), rot(k)
