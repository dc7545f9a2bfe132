"""Paged decode attention: one query token per sequence against its K/V in the paged cache, in one kernel.

q [B, Hq, D]; kv_cache [2, num_blocks, block_size, Hk, D]; block_tables [B, max_blocks] int; seq_lens [B] int
(the query sits at position seq_len - 1 and sees every earlier token) -> out [B, Hq, D].
Grid (B, Hk, SPLITS): each program takes one KV head with the G = Hq / Hk query heads that share it (one K/V load
serves all of them) over one chunk of the context, with an online softmax (flash-decoding). SPLITS is fixed by the
host from the batch shape (enough programs to fill the GPU) and the chunk length from each sequence's actual length
on the device (at least `min_chunk` tokens: launch_config), so the grid suits CUDA graphs: a short context uses one
program per head and the others exit at once. With SPLITS > 1 the last program of a (sequence, KV head) to finish,
told by an atomic counter, merges the chunks by their log-sum-exp and resets the counter: no second kernel. A
context that fits one chunk (every program tells it from seq_len) skips the merge: the first program writes the
output (the merge of one chunk would give the same bits) and no program touches the counter.
With `new` (NewToken), q comes unrotated and the kernel does rope_store_kv's work too: each program normalizes (Qwen3)
and rotates its query heads as it loads them (q itself is left as it was), and the program whose chunk ends at the
new token normalizes and rotates that token's K and stores it and V into its slot before it reads its chunk (a
barrier orders its own threads; no other program reads that slot): one kernel fewer a layer, the same arithmetic
as rope_store_kv then this kernel (asyncllm_kernels.rope.norm_rotate).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from asyncllm_kernels.dependent_launch import launch_options, wait_previous
from asyncllm_kernels.device_shape import device_shape
from asyncllm_kernels.rope import norm_rotate

MAX_COUNTERS = 1 << 16  # (sequence, KV head) pairs one call may have


class LaunchConfig(NamedTuple):
    block_n: int  # context tokens per loop iteration
    num_warps: int
    num_stages: int
    min_chunk: int  # context tokens per program at least (a short context's heads spread over SMs)


# By grid. The long tiles of FEW_PAIRS keep a program's K and V stages in shared memory (128 KB at head_dim 128: one
# program per SM on the H200): while the (sequence, KV head) pairs fit in one wave of resident programs (batch 1,
# where the context is split over programs; SmolLM2's 3 KV heads of 64 dims up to batch ~130) they are the fastest;
# beyond, the short tiles in two warps of MANY_PAIRS, several programs resident per SM: 7-25% faster at Qwen3-0.6B's
# and Llama-3.1-8B's heads at batch 32-256, 9% at SmolLM2's at batch 256, but 1-4% slower at batch 1 and 20% at
# SmolLM2's batch 128 (H200, tools/tune_decode_attention.py; docs/bench/decode_attention_tuning_h200_27c5b24.jsonl,
# docs/bench/decode_attention_tuning_h200_1440ac1.jsonl). Where an SM cannot hold the long tiles' stages at all
# (~100 KB of shared memory per SM, at head_dim 128) every grid takes the short ones (not run on such a GPU here).
FEW_PAIRS = LaunchConfig(128, 4, 2, 128)
MANY_PAIRS = LaunchConfig(64, 2, 2, 64)


def launch_config(batch: int, kv_heads: int, head_dim: int, elem_bytes: int, sms: int,
                  smem_per_sm: int) -> LaunchConfig:
    few_smem = 2 * FEW_PAIRS.num_stages * FEW_PAIRS.block_n * head_dim * elem_bytes  # K and V tiles per stage
    resident = smem_per_sm // few_smem  # 0: an SM cannot hold them (GPUs with ~100 KB per SM, at head_dim 128)
    return FEW_PAIRS if batch * kv_heads <= sms * resident else MANY_PAIRS


NEW_TOKEN_MIN_DIM = 32  # the smallest head_dim the kernel takes a NewToken at (its halves of HALF columns)


class NewToken(NamedTuple):
    """Each sequence's new token, rotated (and normalized) and stored by the decode kernel itself (see the module
    docstring): what rope_store_kv takes."""

    k: torch.Tensor  # [B, Hk, D] unrotated; v [B, Hk, D]
    v: torch.Tensor
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B] cache slots (negative: a padding row, nothing stored)
    cos_sin_cache: torch.Tensor  # [max_position, D] float32
    q_norm: torch.Tensor | None = None  # [D] each, together or not at all
    k_norm: torch.Tensor | None = None
    eps: float = 0.0


def decode_counters(device: torch.device) -> torch.Tensor:
    """Arrival counters for paged_decode_attention: zero between calls (the merging program resets its own).
    Calls that share them must not overlap in time: one per stream (an engine's steps run on one stream)."""
    return torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)


@triton.jit
def _new_token(q_ptr, heads, g_mask, cache_ptr, v_offset, k_ptr, v_ptr, pos_ptr, slot_ptr, cs_ptr, qn_ptr, kn_ptr,
               eps, b, kvh, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, store, GROUP_PAD: tl.constexpr,
               KV_HEADS: tl.constexpr, DIM: tl.constexpr, NORM: tl.constexpr):
    """NewToken's work: q's heads [GROUP_PAD, DIM] (normalized and) rotated; when `store`, the new token's K of
    head kvh (normalized and) rotated and its V into the token's slot (unless negative), then a barrier."""
    HALF: tl.constexpr = DIM // 2
    h = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + b)
    cos = tl.load(cs_ptr + pos * DIM + h)[None, :]
    sin = tl.load(cs_ptr + pos * DIM + HALF + h)[None, :]
    q_src = q_ptr + b * stride_qb + heads[:, None] * stride_qh + h[None, :]
    q1 = tl.load(q_src, mask=g_mask[:, None], other=0.0)
    q2 = tl.load(q_src + HALF, mask=g_mask[:, None], other=0.0)
    q1, q2 = norm_rotate(q1, q2, cos, sin, qn_ptr, eps, HALF, NORM)
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GROUP_PAD, DIM))  # [q1 | q2] per row
    if store:
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if slot >= 0:
            k_src = k_ptr + b * stride_kb + kvh * stride_kh + h[None, :]
            k1, k2 = norm_rotate(tl.load(k_src), tl.load(k_src + HALF), cos, sin, kn_ptr, eps, HALF, NORM)
            dst = cache_ptr + slot * (KV_HEADS * DIM) + kvh * DIM + h[None, :]
            tl.store(dst, k1)
            tl.store(dst + HALF, k2)
            d = tl.arange(0, DIM)
            tl.store(cache_ptr + v_offset + slot * (KV_HEADS * DIM) + kvh * DIM + d,
                     tl.load(v_ptr + b * stride_vb + kvh * DIM + d))
    tl.debug_barrier()  # the stores above are visible to every thread of this program before its chunk's loads
    return q


@triton.jit(do_not_specialize=["stride_bt"])  # the width of a step's block tables varies
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, o_ptr, lse_ptr, out_ptr, count_ptr, scale, v_offset,
                   stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
                   k_ptr, v_ptr, pos_ptr, slot_ptr, cs_ptr, qn_ptr, kn_ptr, eps, stride_kb, stride_kh, stride_vb,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
                   PRECISION: tl.constexpr, SPLIT_P: tl.constexpr, PDL: tl.constexpr, NEW: tl.constexpr,
                   NORM: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    wait_previous(PDL)
    seq_len = tl.load(seq_lens_ptr + b)
    chunk = tl.maximum(tl.cdiv(seq_len, SPLITS), MIN_CHUNK)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM)
    g_mask = g < GROUP
    heads = kvh * GROUP + g
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
    if start < end:
        if NEW:  # rotated here; this chunk ends at the new token: its K and V stored first
            q = _new_token(q_ptr, heads, g_mask, cache_ptr, v_offset, k_ptr, v_ptr, pos_ptr, slot_ptr, cs_ptr, qn_ptr,
                           kn_ptr, eps, b, kvh, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, end == seq_len,
                           GROUP_PAD, KV_HEADS, DIM, NORM)
        else:
            q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None],
                        other=0.0)
        row = KV_HEADS * DIM  # elements of one token's K (or V) across heads
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            block = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_off = slot[:, None] * row + kvh * DIM + d[None, :]
            k = tl.load(cache_ptr + kv_off, mask=valid[:, None], other=0.0)
            v = tl.load(cache_ptr + v_offset + kv_off, mask=valid[:, None], other=0.0)  # in flight with k
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if SPLIT_P:  # bf16/fp16 V: P as a high + low half-precision pair (~16 mantissa bits, not 7)
                p_hi = p.to(v.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
                pv = tl.dot(p_hi, v, input_precision=PRECISION) + tl.dot(p_lo, v, input_precision=PRECISION)
            else:
                pv = tl.dot(p, v, input_precision=PRECISION)
            acc = acc * alpha[:, None] + pv.to(tl.float32)
            m_i = m_new
    out_rows = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    used = tl.cdiv(seq_len, chunk)  # programs with a nonempty chunk: the first `used` (every program agrees)
    if SPLITS == 1 or used == 1:  # one chunk holds the whole context: its program writes the output, no merge
        if split == 0:
            tl.store(out_rows, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = (b * KV_HEADS * GROUP + heads) * SPLITS  # [GROUP_PAD] first (b, head, split 0) row
        if start < end:  # empty chunks write nothing: the merge reads the first cdiv(seq_len, chunk) only
            tl.store(o_ptr + (part + split)[:, None] * DIM + d[None, :], acc / l_i[:, None], mask=g_mask[:, None])
            tl.store(lse_ptr + part + split, m_i + tl.log(l_i), mask=g_mask)
        tl.debug_barrier()  # every thread's partial stores are issued before the release below
        counter = count_ptr + b * KV_HEADS + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:  # last to arrive: merge
            tl.debug_barrier()
            tl.store(counter, 0)
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            for i in range(used):
                m = tl.maximum(m, tl.load(lse_ptr + part + i, mask=g_mask, other=0.0, cache_modifier=".cg"))
            total = tl.zeros([GROUP_PAD], tl.float32)
            merged = tl.zeros([GROUP_PAD, DIM], tl.float32)
            for i in range(used):
                w = tl.exp(tl.load(lse_ptr + part + i, mask=g_mask, other=0.0, cache_modifier=".cg") - m)
                o = tl.load(o_ptr + (part + i)[:, None] * DIM + d[None, :], mask=g_mask[:, None], other=0.0,
                            cache_modifier=".cg")
                total += w
                merged += w[:, None] * o
            tl.store(out_rows, (merged / total[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def _num_splits(batch: int, kv_heads: int, max_seq_len: int, sms: int, min_chunk: int) -> int:
    """Programs per (sequence, KV head): about two programs per SM over the grid, no more than the longest context
    has chunks of min_chunk."""
    return max(1, min(-(-2 * sms // (batch * kv_heads)), -(-max_seq_len // min_chunk)))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                           counters: torch.Tensor | None = None, config: LaunchConfig | None = None,
                           pdl: bool = False, new: NewToken | None = None) -> torch.Tensor:
    """`max_seq_len` (host int, an upper bound of seq_lens) fixes the grid: no device-to-host sync here.
    `counters` (decode_counters): the caller's, reused across calls; None allocates fresh ones (a memset).
    `config`: the launch configuration (tests and tuning); None: `launch_config`'s for this grid.
    `pdl`: launched with programmatic dependent launch (asyncllm_kernels.dependent_launch).
    `new`: q is unrotated and the new tokens' K/V are not stored yet: the kernel does both (module docstring)."""
    batch, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    assert heads % kv_heads == 0 and dim == triton.next_power_of_2(dim) and kv_cache.is_contiguous()
    assert batch * kv_heads <= MAX_COUNTERS
    if new is not None:
        assert new.k.shape == (batch, kv_heads, dim) and new.k.stride(-1) == 1 and new.v.stride(1) == dim
        assert new.v.stride(2) == 1 and (new.q_norm is None) == (new.k_norm is None) and dim >= NEW_TOKEN_MIN_DIM
    group = heads // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    sms, smem = device_shape(q.device)
    config = config or launch_config(batch, kv_heads, dim, kv_cache.element_size(), sms, smem)
    splits = _num_splits(batch, kv_heads, max_seq_len, sms, config.min_chunk)
    o = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device) if splits > 1 else out
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    if counters is None:
        counters = decode_counters(q.device)
    norm = new is not None and new.q_norm is not None
    extra = (new.k, new.v, new.positions, new.slots, new.cos_sin_cache, new.q_norm if norm else q,
             new.k_norm if norm else q, new.eps, new.k.stride(0), new.k.stride(1), new.v.stride(0)) if new else \
        (q, q, q, q, q, q, q, 0.0, 0, 0, 0)
    _decode_kernel[(batch, kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, o, lse, out, counters, scale, kv_cache[0].numel(), q.stride(0),
        q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1), *extra, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), KV_HEADS=kv_heads, DIM=dim, BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n, SPLITS=splits, MIN_CHUNK=config.min_chunk, num_warps=config.num_warps,
        num_stages=config.num_stages,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no TF32 rounding for float32 inputs
        SPLIT_P=q.dtype != torch.float32, PDL=pdl, NEW=new is not None, NORM=norm, **launch_options(pdl))
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
