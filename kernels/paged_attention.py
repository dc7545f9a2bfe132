"""Paged decode attention: one query token per sequence against its K/V in the paged cache.

q [B, Hq, D]; kv_cache [2, num_blocks, block_size, Hk, D]; block_tables [B, max_blocks] int; seq_lens [B] int
(the query sits at position seq_len - 1 and sees every earlier token) -> out [B, Hq, D].
Grid (B, Hk, splits): each program takes one KV head with the G = Hq / Hk query heads that share it (one K/V load
serves all of them) over one PARTITION of the context, with an online softmax; a second kernel merges the
partitions by their log-sum-exp (flash-decoding), so long contexts use the whole GPU even at batch 1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PARTITION = 512  # context tokens per program


@triton.jit
def _decode_partition_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, scale, v_offset,
                             stride_qb, stride_qh, stride_bt, n_splits,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
                             DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                             PARTITION: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * PARTITION
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    out_idx = (b * KV_HEADS * GROUP + heads) * n_splits + split  # [GROUP_PAD] rows of (b, head, split)
    if start >= seq_len:
        tl.store(lse_ptr + out_idx, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g_mask)
        return
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
    end = tl.minimum(start + PARTITION, seq_len)
    row = KV_HEADS * DIM  # elements of one token's K (or V) across heads
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * row + kvh * DIM + d[None, :]
        k = tl.load(cache_ptr + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(cache_ptr + v_offset + kv_off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + out_idx[:, None] * DIM + d[None, :], o, mask=g_mask[:, None])
    tl.store(lse_ptr + out_idx, m_i + tl.log(l_i), mask=g_mask)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, n_splits, stride_ob, stride_oh, HEADS: tl.constexpr, DIM: tl.constexpr,
                  SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM)
    base = (b * HEADS + h) * n_splits
    lse = tl.load(lse_ptr + base + s, mask=s < n_splits, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = tl.where(s < n_splits, w, 0.0)
    o = tl.load(o_ptr + (base + s)[:, None] * DIM + d[None, :], mask=(w > 0)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int) -> torch.Tensor:
    """`max_seq_len` (host int, an upper bound of seq_lens) fixes the grid: no device-to-host sync here."""
    batch, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    assert heads % kv_heads == 0 and dim == triton.next_power_of_2(dim) and kv_cache.is_contiguous()
    group = heads // kv_heads
    splits = max(1, math.ceil(max_seq_len / PARTITION))
    o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    _decode_partition_kernel[(batch, kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, o, lse, scale, kv_cache[0].numel(), q.stride(0), q.stride(1),
        block_tables.stride(0), splits, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        KV_HEADS=kv_heads, DIM=dim, BLOCK_SIZE=block_size, BLOCK_N=64, PARTITION=PARTITION, num_warps=4,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # no TF32 rounding for float32 inputs
    _merge_kernel[(batch, heads)](o, lse, out, splits, out.stride(0), out.stride(1), HEADS=heads, DIM=dim,
                                  SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    return out


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    _, _, block_size, kv_heads, dim = kv_cache.shape
    group = q.shape[1] // kv_heads
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = kv_cache[0].reshape(-1, kv_heads, dim)[slots].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = kv_cache[1].reshape(-1, kv_heads, dim)[slots].float().repeat_interleave(group, dim=1)
        w = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", w.softmax(-1), v))
    return torch.stack(outs).to(q.dtype)
