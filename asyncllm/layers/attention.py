"""Attention over the paged KV cache, behind a backend interface.

A backend is planned once per step (`plan`, host-side work: indices, masks, wrapper plans) and then run once per
layer (`forward`). The `torch` backend is the reference: plain PyTorch, runs on any device, including CPU.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V; flashinfer's NHD layout
for a (k, v) pair). A token's slot is block_id * block_size + offset.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.device import to_device
from asyncllm.layers import kernel_choice
from asyncllm.layers.norm import rms_norm_torch
from asyncllm.layers.rotary import apply_rotary

# Decode steps of the GPU backends' Triton path (CUDA-graph decode steps; the triton backend's every decode-only step)
# of at most this many sequences (a graph's padded batch): the rotary embedding (with Qwen3's q/k norms) and the new
# token's KV store inside the decode attention kernel (asyncllm_kernels.paged_attention.NewToken) instead of
# rope_store_kv before it, one kernel fewer a layer. Faster at small batches, slower at large ones where every
# program of the kernel re-rotates its query heads (H100, 16ad5d0: SmolLM2-135M b1 0.75 vs 0.85 ms/token, Qwen3-0.6B
# b1 1.19 vs 1.22, b256 4.33 vs 4.18; H200, a6d49dc: even at 32, apart faster from 64 on; docs/BENCHMARKS.md);
# head_dim 32 and up. 0 turns it off. Read when a backend is built.
ROPE_IN_DECODE_MAX_SEQS = 32


class Rotary(NamedTuple):
    """What the backend applies to q and k before the store: with q_norm / k_norm weights [D] (Qwen3; the GPU
    backends fuse it), each head's RMSNorm, then the rotary embedding."""

    positions: torch.Tensor  # [T]
    cos_sin_cache: torch.Tensor  # [max_position, D] float32
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 0.0


@dataclass
class AttentionMetadata:
    """One step's attention layout. Tokens of a step are packed: sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1]; its new tokens are the last query_lens[b] of its seq_lens[b]."""

    query_start_loc: torch.Tensor  # [B + 1] int64, device
    seq_lens: torch.Tensor  # [B] int64, device: KV length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, device, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, device: where each new token's K/V goes
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    block_tables_cpu: np.ndarray | None = None  # [B, max_blocks] int64, host copy of block_tables

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    name: str

    def plan(self, meta: AttentionMetadata) -> None:
        """Host-side preparation for one step; called once before the forward pass."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        """Store k/v [T, Hk, D] of the new tokens into kv_cache, then attend q [T, Hq, D] -> [T, Hq, D]. With
        `rotary`, q and k are rotated first (the GPU backends fuse it with the store)."""


class GraphAttentionBackend(AttentionBackend, Protocol):
    """The GPU backends: besides `forward`, the attention alone of a planned step whose K/V the caller stored
    (store_new_kv) — what piecewise CUDA graphs run between their pieces."""

    kernels: Any
    pdl: bool  # the Triton kernels launched with programmatic dependent launch (kernel_choice)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """q [n, Hq, D] of the planned step's n tokens -> out [n, Hq, D]."""

    def plan_capture(self, meta: AttentionMetadata) -> None:
        """A decode graph is being captured: plan on its static buffers (meta's tensors), which the captured kernels
        read at every replay. Nothing is planned before a replay: a step changes only those buffers' contents."""


class TorchAttentionBackend:
    """Reference backend: gathers each sequence's K/V into a padded batch and calls SDPA once per layer.

    GQA without copying K/V: the G query heads that share a KV head are folded into the query axis, so SDPA sees
    [B, Hk, G * max_q, D] queries against [B, Hk, max_kv, D] keys.
    """

    name = "torch"

    def plan(self, meta: AttentionMetadata) -> None:
        device = meta.seq_lens.device
        self.meta = meta
        num_seqs, max_q, max_kv = meta.num_seqs, max(meta.query_lens_cpu), max(meta.seq_lens_cpu)
        self.shape = (num_seqs, max_q, max_kv)
        self.decode_only = max_q == 1  # one query per sequence: packed rows are already the padded layout
        q_lens = meta.query_start_loc.diff()
        q_idx = torch.arange(max_q, device=device)
        kv_idx = torch.arange(max_kv, device=device)
        q_valid = q_idx[None, :] < q_lens[:, None]  # [B, max_q]
        if not self.decode_only:  # padded [B, max_q] layout <-> packed rows
            self.q_gather = torch.where(q_valid, meta.query_start_loc[:-1, None] + q_idx[None, :], 0).flatten()
            self.q_scatter = (torch.arange(num_seqs, device=device)[:, None] * max_q + q_idx[None, :])[q_valid]
        # every KV slot of every sequence, padded to max_kv
        blocks = meta.block_tables.gather(1, (kv_idx // meta.block_size)[None, :].expand(num_seqs, -1))
        self.kv_slots = (blocks * meta.block_size + kv_idx % meta.block_size).flatten()
        # causal mask aligned to the end: query i of sequence b sits at position seq_len - q_len + i
        q_pos = (meta.seq_lens - q_lens)[:, None] + q_idx[None, :]
        mask = kv_idx[None, None, :] <= q_pos[:, :, None]
        mask[~q_valid] = False
        mask[..., 0] |= ~q_valid  # padded query rows attend to one slot so softmax stays finite
        self.mask = mask[:, None]  # [B, 1, max_q, max_kv]; repeated per query group in forward
        self._group_masks: dict[int, torch.Tensor] = {}

    def _mask(self, groups: int) -> torch.Tensor:
        if groups not in self._group_masks:
            self._group_masks[groups] = self.mask.repeat(1, 1, groups, 1)
        return self._group_masks[groups]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        if rotary is not None:
            if rotary.q_norm is not None and rotary.k_norm is not None:
                q, k = rms_norm_torch(q, rotary.q_norm, rotary.eps), rms_norm_torch(k, rotary.k_norm, rotary.eps)
            q, k = apply_rotary(rotary.positions, q, k, rotary.cos_sin_cache)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, self.meta.slot_mapping, k)
        kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, self.meta.slot_mapping, v)
        return self._attend(q, kv_cache, scale)

    def _attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the packed queries over the cache (the new tokens' K/V already stored)."""
        num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
        num_heads = q.shape[1]
        groups = num_heads // num_kv_heads
        k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
        v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
        num_seqs, max_q, max_kv = self.shape
        kp = k_flat.index_select(0, self.kv_slots).view(num_seqs, max_kv, num_kv_heads, head_dim).transpose(1, 2)
        vp = v_flat.index_select(0, self.kv_slots).view(num_seqs, max_kv, num_kv_heads, head_dim).transpose(1, 2)
        if self.decode_only:  # [B, Hq, D] is [B, Hk, G, D]: head h uses KV head h // G
            qp = q.view(num_seqs, num_kv_heads, groups, head_dim)
        else:
            qp = q.index_select(0, self.q_gather).view(num_seqs, max_q, num_kv_heads, groups, head_dim)
            qp = qp.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, groups * max_q, head_dim)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self._mask(groups), scale=scale)
        if self.decode_only:
            return out.reshape(num_seqs, num_heads, head_dim)
        out = out.view(num_seqs, num_kv_heads, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(num_seqs * max_q, num_heads, head_dim).index_select(0, self.q_scatter)


class TritonAttentionBackend(TorchAttentionBackend):
    """CUDA: K/V stored by a Triton kernel; decode rows attend with the Triton paged decode kernel (no gather, no
    padding); prefill rows attend like the torch backend, over the prefill sequences only."""

    name = "triton"

    def __init__(self) -> None:
        import asyncllm_kernels  # CUDA only: imports triton

        self.kernels = asyncllm_kernels
        self.pdl = kernel_choice.current().pdl
        self.rope_in_decode_max_seqs = ROPE_IN_DECODE_MAX_SEQS
        self.counters: torch.Tensor | None = None  # the decode kernel's, allocated on first use (its device)

    def plan(self, meta: AttentionMetadata) -> None:
        self.full = meta
        q_lens = meta.query_lens_cpu
        dec = [i for i, n in enumerate(q_lens) if n == 1]
        pre = [i for i, n in enumerate(q_lens) if n > 1]
        self.mixed = bool(dec and pre)
        self.decode_only = not pre
        # decode-only steps of few sequences rotate and store the new token inside the decode kernel (forward also
        # needs head_dim >= NEW_TOKEN_MIN_DIM)
        self.new_token_in_kernel = self.decode_only and meta.num_seqs <= self.rope_in_decode_max_seqs
        if pre and not dec:
            super().plan(meta)
            return
        device = meta.seq_lens.device
        self.dec_max_len = max(meta.seq_lens_cpu[i] for i in dec)
        if not self.mixed:  # nothing to copy (CUDA-graph capture plans here)
            self.dec_tables, self.dec_seq_lens = meta.block_tables, meta.seq_lens
            return
        dec_seqs = to_device(dec, device)
        self.dec_tables = meta.block_tables.index_select(0, dec_seqs)
        self.dec_seq_lens = meta.seq_lens.index_select(0, dec_seqs)
        # rows of each part within the packed tokens, and a torch plan over the prefill sequences
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        self.dec_rows = to_device([starts[i] for i in dec], device)
        self.pre_rows = to_device([t for i in pre for t in range(starts[i], starts[i + 1])], device)
        pre_seqs = to_device(pre, device)
        pre_lens = [q_lens[i] for i in pre]
        super().plan(AttentionMetadata(
            query_start_loc=to_device([0, *itertools.accumulate(pre_lens)], device),
            seq_lens=meta.seq_lens.index_select(0, pre_seqs), block_tables=meta.block_tables.index_select(0, pre_seqs),
            slot_mapping=meta.slot_mapping, query_lens_cpu=pre_lens,
            seq_lens_cpu=[meta.seq_lens_cpu[i] for i in pre], block_size=meta.block_size))

    def plan_capture(self, meta: AttentionMetadata) -> None:
        """(GraphAttentionBackend) the decode kernel's tables and lengths are the graph's static buffers."""
        self.plan(meta)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        if self.new_token_in_kernel and rotary is not None and q.shape[-1] >= self.kernels.NEW_TOKEN_MIN_DIM:
            new = self.kernels.NewToken(k, v, rotary.positions, self.full.slot_mapping, rotary.cos_sin_cache,
                                        rotary.q_norm, rotary.k_norm, rotary.eps)
            return self._attend_stored(q, kv_cache, scale, new)
        store_new_kv(self.kernels, q, k, v, kv_cache, self.full.slot_mapping, rotary, self.pdl)
        return self._attend_stored(q, kv_cache, scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Piecewise CUDA graphs: the planned step's attention, its K/V already stored, into `out`."""
        out.copy_(self._attend_stored(q, kv_cache, scale))

    def _attend_stored(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, new: Any = None) -> torch.Tensor:
        """`new` (decode-only steps): the kernel's NewToken, q unrotated and the new K/V not stored yet."""
        kern = self.kernels
        if not self.decode_only and not self.mixed:
            return self._attend(q, kv_cache, scale)
        if self.counters is None:  # first use is an eager step (a graph's warm-up precedes its capture)
            self.counters = kern.decode_counters(q.device)
        if self.decode_only:
            return kern.paged_decode_attention(q, kv_cache, self.dec_tables, self.dec_seq_lens, scale,
                                               self.dec_max_len, self.counters, pdl=self.pdl, new=new)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[self.dec_rows] = kern.paged_decode_attention(q[self.dec_rows], kv_cache, self.dec_tables,
                                                         self.dec_seq_lens, scale, self.dec_max_len, self.counters,
                                                         pdl=self.pdl)
        out[self.pre_rows] = self._attend(q[self.pre_rows], kv_cache, scale)
        return out


def store_new_kv(kernels: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, rotary: Rotary | None, pdl: bool) -> None:
    """The GPU backends' first step: K/V into the cache; with `rotary`, q (normalized and) rotated in place and k
    (normalized and) rotated on its way into the cache, in the same kernel (with programmatic dependent launch when
    `pdl`)."""
    if rotary is None:
        kernels.store_kv(k, v, kv_cache, slot_mapping, pdl=pdl)
    else:
        kernels.rope_store_kv(rotary.positions, q, k, v, rotary.cos_sin_cache, kv_cache, slot_mapping, rotary.q_norm,
                              rotary.k_norm, rotary.eps, pdl=pdl)


class Attention(nn.Module):
    """Paged attention of one layer. The runner attaches `backend` and this layer's `kv_cache` before use."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary | None = None) -> torch.Tensor:
        assert self.backend is not None and self.kv_cache is not None, "runner did not attach the KV cache"
        return self.backend.forward(q, k, v, self.kv_cache, self.scale, rotary)
