"""Rotary embedding (rotate-half layout) from a float32 cos/sin cache [max_position, D] (cos in the first half, sin
in the second) indexed by positions [T]; any rope scaling (Llama-3, linear, yarn) is baked into the cache.
`rope_store_kv` rotates q [T, Hq, D] in place and writes the rotated k and v [T, Hk, D] into their paged slots of
one layer's cache [2, num_blocks, block_size, Hk, D] (slot = block * block_size + offset; negative slots, the
padding rows of a captured batch, are skipped): rotary embedding and KV store in one kernel. With q_norm / k_norm
weights [D] (Qwen3), each q and k head is RMS-normalized first (rounded like an eager RMSNorm), in the same kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, wait_previous


@triton.jit
def _rotated(x1, x2, cos, sin):
    """(x1, x2) halves -> rotated halves. cos/sin rounded to the activations' dtype like transformers; products in
    float32, rounded once."""
    dt = x1.dtype
    c, s = cos.to(dt).to(tl.float32), sin.to(dt).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * c - x2f * s).to(dt), (x2f * c + x1f * s).to(dt)


@triton.jit
def norm_rotate(x1, x2, cos, sin, norm_ptr, eps, HALF: tl.constexpr, NORM: tl.constexpr):
    """Rows of (x1, x2) halves [R, HALF] -> rotated halves; with NORM each row is RMS-normalized by the weights
    [2 * HALF] at norm_ptr first, like add_norm_store (normalized in float32, rounded, times the weight, rounded).
    Shared with the decode kernel that rotates and stores the new token itself (paged_attention)."""
    if NORM:
        d = tl.arange(0, HALF)[None, :]
        dt = x1.dtype
        x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
        r = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(norm_ptr + d).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + d).to(tl.float32)
        x1 = (w1 * (x1f * r).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (x2f * r).to(dt).to(tl.float32)).to(dt)
    return _rotated(x1, x2, cos, sin)


@triton.jit
def _rotate_heads(ptr, stride_h, n_heads, cos, sin, dst_ptr, dst_stride_h, norm_ptr, eps, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    """Rotate the n_heads rows of one token at ptr (stride_h apart) into dst_ptr (dst_stride_h apart); with NORM,
    each row is RMS-normalized by the weights at norm_ptr first."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    for start in range(0, n_heads, BLOCK_H):
        m = (start + h) < n_heads
        src = ptr + (start + h) * stride_h + d
        x1, x2 = tl.load(src, mask=m, other=0.0), tl.load(src + HALF, mask=m, other=0.0)
        y1, y2 = norm_rotate(x1, x2, cos, sin, norm_ptr, eps, HALF, NORM)
        dst = dst_ptr + (start + h) * dst_stride_h + d
        tl.store(dst, y1, mask=m)
        tl.store(dst + HALF, y2, mask=m)


@triton.jit
def _rope_store_kv_kernel(q_ptr, k_ptr, v_ptr, cache_ptr, pos_ptr, kv_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, eps,
                          n_q_heads, n_k_heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, v_offset,
                          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr, NORM: tl.constexpr,
                          PDL: tl.constexpr):
    t = tl.program_id(0)
    wait_previous(PDL)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * 2 * HALF + d)[None, :]
    sin = tl.load(cache_ptr + pos * 2 * HALF + HALF + d)[None, :]
    q = q_ptr + t * stride_qt
    _rotate_heads(q, stride_qh, n_q_heads, cos, sin, q, stride_qh, q_norm_ptr, eps, HALF, BLOCK_H, NORM)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        row = n_k_heads * 2 * HALF  # one token's K (or V) over its heads, contiguous in the cache
        dst = kv_ptr + slot.to(tl.int64) * row
        _rotate_heads(k_ptr + t * stride_kt, stride_kh, n_k_heads, cos, sin, dst, 2 * HALF, k_norm_ptr, eps, HALF,
                      BLOCK_H, NORM)
        for start in range(0, row, BLOCK_V):  # v's heads are contiguous within the token (stride_vh = D)
            i = start + tl.arange(0, BLOCK_V)
            tl.store(dst + v_offset + i, tl.load(v_ptr + t * stride_vt + i, mask=i < row), mask=i < row)


def rope_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
                  pdl: bool = False) -> None:
    """q (normalized and) rotated in place; (normalized and) rotated k and v into the cache (k itself is left as it
    was). q_norm and k_norm come together or not at all. `pdl`: launched with programmatic dependent launch
    (asyncllm_kernels.dependent_launch)."""
    tokens, n_q, dim = q.shape
    n_k = k.shape[1]
    assert dim % 2 == 0 and triton.next_power_of_2(dim // 2) == dim // 2 and q.stride(-1) == 1 and k.stride(-1) == 1
    assert kv_cache.is_contiguous() and v.stride(1) == dim and v.stride(2) == 1
    assert (q_norm is None) == (k_norm is None)
    if tokens == 0:
        return
    norm = q_norm is not None
    _rope_store_kv_kernel[(tokens,)](
        q, k, v, cos_sin_cache, positions, kv_cache, slot_mapping, q_norm if norm else q, k_norm if norm else k, eps,
        n_q, n_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), kv_cache[0].numel(), HALF=dim // 2,
        BLOCK_H=min(triton.next_power_of_2(max(n_q, n_k)), 16), BLOCK_V=min(triton.next_power_of_2(n_k * dim), 1024),
        NORM=norm, PDL=pdl, **launch_options(pdl))


def rope_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    return rot(q), rot(k)
