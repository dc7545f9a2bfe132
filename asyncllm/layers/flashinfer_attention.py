"""flashinfer attention backend (CUDA, bf16/fp16): the default where flashinfer imports and its kernels load.

One plan per step, on the host: page table as CSR (indptr, indices, last page length) built with numpy from the
step's host block tables. Steps with any multi-token row (prefill, chunked prefill, prefix hits) run the paged
prefill wrapper (fa2; the causal mask is aligned to the end of each sequence, so new tokens after a cached prefix
need nothing else); eager decode-only steps run the paged decode wrapper (tensor cores when >= 4 query heads share
a KV head). Decode steps replayed from CUDA graphs run the Triton paged decode kernel on the graph's static block
tables and lengths instead: one kernel per layer (flashinfer's needs a merge kernel after it) and no plan before
each replay. New K/V are stored by the Triton KV-store kernel.

Each wrapper's plan() refills its own page-locked host buffer and copies it to the device on the step's stream;
an event recorded after the plan is waited on before the next plan of that wrapper, so a plan never overwrites
host memory a queued copy has not read yet (in practice the wait is over: that step has started long before).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from asyncllm.device import host_tensor, to_device
from asyncllm.layers.attention import AttentionMetadata, Rotary, TritonAttentionBackend, store_new_kv


WORKSPACE_BYTES = 128 << 20


class FlashInferAttentionBackend:
    name = "flashinfer"

    def __init__(self, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float) -> None:
        import flashinfer

        import asyncllm_kernels

        self.kernels = asyncllm_kernels
        _pin_flashinfer_range_buffers()
        self.device, self.dtype = device, dtype
        self.heads = (num_heads, num_kv_heads, head_dim)
        self.scale = scale
        self.tensor_cores = num_heads // num_kv_heads >= 4
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores, backend="fa2")
        self.graphs = TritonAttentionBackend()  # CUDA-graph decode steps attend through it
        self.pdl = self.graphs.pdl  # the Triton kernels' launch (kernel_choice)
        self._planned: dict[int, torch.cuda.Event] = {}  # id(wrapper) -> event after its last plan
        self.wrapper: Any = None
        self.slot_mapping: torch.Tensor | None = None

    # ---- planning -------------------------------------------------------------------------------------------
    @staticmethod
    def page_table(meta: AttentionMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR page table (indptr [B+1], indices [nnz], last_page_len [B]) as int32."""
        assert meta.block_tables_cpu is not None, "the flashinfer backend needs host block tables"
        bs = meta.block_size
        seq_lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
        tables = meta.block_tables_cpu
        pages = (seq_lens + bs - 1) // bs
        indptr = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(pages, out=indptr[1:])
        indices = tables[np.arange(tables.shape[1])[None, :] < pages[:, None]].astype(np.int32)
        last = (seq_lens - (pages - 1) * bs).astype(np.int32)
        return indptr, indices, last

    def _plan(self, wrapper: Any, meta: AttentionMetadata) -> None:
        event = self._planned.get(id(wrapper))
        if event is not None:
            event.synchronize()  # the previous plan's host buffer has been copied (see the module docstring)
        indptr, indices, last = self.page_table(meta)
        dev, i32 = self.device, torch.int32
        hq, hk, d = self.heads
        kw = dict(q_data_type=self.dtype, kv_data_type=self.dtype, sm_scale=self.scale, non_blocking=True)
        paged = (host_tensor(indptr, i32, dev), to_device(indices, dev, i32), host_tensor(last, i32, dev))
        if wrapper is self.prefill:
            qo_indptr = np.zeros(len(meta.query_lens_cpu) + 1, dtype=np.int32)
            np.cumsum(meta.query_lens_cpu, out=qo_indptr[1:])
            wrapper.plan(host_tensor(qo_indptr, i32, dev), *paged, hq, hk, d, meta.block_size, causal=True, **kw)
        else:
            wrapper.plan(*paged, hq, hk, d, meta.block_size, **kw)
        event = torch.cuda.Event()
        event.record()
        self._planned[id(wrapper)] = event

    def plan(self, meta: AttentionMetadata) -> None:
        self.slot_mapping = meta.slot_mapping
        self.wrapper = self.decode if max(meta.query_lens_cpu) == 1 else self.prefill
        self._plan(self.wrapper, meta)

    def plan_capture(self, meta: AttentionMetadata) -> None:
        """(GraphAttentionBackend) decode graphs capture the Triton backend, planned on their static buffers:
        forward() routes to it until the next plan()."""
        self.graphs.plan_capture(meta)
        self.wrapper = None

    # ---- per layer ------------------------------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
        rotary: Rotary | None = None,
    ) -> torch.Tensor:
        if self.wrapper is None:  # capturing a decode graph
            return self.graphs.forward(q, k, v, kv_cache, scale, rotary)
        assert self.slot_mapping is not None, "plan() first"
        store_new_kv(self.kernels, q, k, v, kv_cache, self.slot_mapping, rotary, self.pdl)
        return self.wrapper.run(q, (kv_cache[0], kv_cache[1]))

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Piecewise CUDA graphs: the planned step's attention, its K/V already stored, into `out`."""
        self.wrapper.run(q, (kv_cache[0], kv_cache[1]), out=out)


def _pin_flashinfer_range_buffers(largest: int = 1 << 13) -> None:
    """The tensor-core decode plan copies a cached host `arange` (flashinfer.utils._get_range_buf(n, "cpu")) to the
    device; from pageable memory that copy waits for the stream to drain, which serializes overlapped steps (seen
    on the H100: Llama-3.1-8B batch 1 went from 7.4 to 10.0 ms/step with overlap on). Seed that cache with pinned
    buffers, keyed as flashinfer keys them (powers of two)."""
    from flashinfer import utils

    cache = getattr(utils, "_cache_buf", None)
    if cache is None:
        return
    n = 1
    while n <= largest:
        key = (f"range_{n}", "cpu")
        if key not in cache or not cache[key].is_pinned():
            cache[key] = torch.arange(n, dtype=torch.int32).pin_memory()
        n *= 2


def self_test(backend: FlashInferAttentionBackend, block_size: int) -> None:
    """Run a prefill and a decode step on a one-block cache; raises if a kernel variant does not load."""
    hq, hk, d = backend.heads
    dev = backend.device
    cache = torch.zeros(2, 1, block_size, hk, d, dtype=backend.dtype, device=dev)
    tables = np.zeros((1, 1), dtype=np.int64)
    for q_len in (2, 1):
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, q_len], device=dev), seq_lens=torch.tensor([2], device=dev),
            block_tables=torch.zeros(1, 1, dtype=torch.int64, device=dev),
            slot_mapping=torch.arange(2 - q_len, 2, device=dev), query_lens_cpu=[q_len], seq_lens_cpu=[2],
            block_size=block_size, block_tables_cpu=tables)
        backend.plan(meta)
        x = torch.randn(q_len, hk, d, dtype=backend.dtype, device=dev)
        out = backend.forward(torch.randn(q_len, hq, d, dtype=backend.dtype, device=dev), x, x, cache, backend.scale)
        if not torch.isfinite(out).all():
            raise RuntimeError("flashinfer self-test produced non-finite attention")
    torch.cuda.synchronize(dev)
