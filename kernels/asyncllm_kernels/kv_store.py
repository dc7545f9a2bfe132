"""Scatter the new tokens' K and V [T, Hk, D] into their paged slots of one layer's cache
[2, num_blocks, block_size, Hk, D]; slot = block * block_size + offset, one per token. Negative slots are skipped
(padding rows of a captured batch)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, wait_previous


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, v_offset, ROW: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    wait_previous(PDL)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        for start in range(0, ROW, BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = i < ROW
            tl.store(cache_ptr + slot * ROW + i, tl.load(k_ptr + t * stride_kt + i, mask=m), mask=m)
            tl.store(cache_ptr + v_offset + slot * ROW + i, tl.load(v_ptr + t * stride_vt + i, mask=m), mask=m)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             pdl: bool = False) -> None:
    """`pdl`: launched with programmatic dependent launch (asyncllm_kernels.dependent_launch)."""
    tokens, heads, dim = k.shape
    assert kv_cache.is_contiguous() and k.stride(1) == dim and v.stride(1) == dim
    if tokens == 0:
        return
    row = heads * dim
    _store_kv_kernel[(tokens,)](k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache[0].numel(),
                                ROW=row, BLOCK=min(triton.next_power_of_2(row), 1024), PDL=pdl,
                                **launch_options(pdl))


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    heads, dim = k.shape[1:]
    keep = slot_mapping >= 0
    kv_cache[0].view(-1, heads, dim)[slot_mapping[keep]] = k[keep]
    kv_cache[1].view(-1, heads, dim)[slot_mapping[keep]] = v[keep]
