"""Decode steps replayed from CUDA graphs: the whole step, from the packed inputs to the sampled ids.

Per padded batch size bs (1, 2, 4, 8, then multiples of 16 up to `cuda_graph_max_bs`), two graphs share one
memory pool:
  forward: the step's ids, positions and rows from a static device buffer -> pending ids fed from the previous
           step's sampled ids, KV slots and block tables from the device-resident row tables (one kernel on the
           fast path: asyncllm_kernels.decode_inputs), the model, the LM head into a static logits buffer
           [max_bs, vocab] (model dtype, no float copy);
  sample:  the sampling kernel over those logits with each row's parameters -> the runner's sampled-ids buffer.
A step copies its packed ids/positions/rows into the static buffer (one device-to-device copy), replays
forward, applies repetition penalties to the logits when a row has them (rank 0, eagerly), and replays sample.
Padded rows use the dummy row: KV slot -1 (not stored), length 1, greedy.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from asyncllm.engine.scheduler import Batch
from asyncllm.engine.step_inputs import RowTables, Step, decode_inputs, even
from asyncllm.layers.attention import AttentionMetadata, GraphAttentionBackend
from asyncllm.layers.sampler import Sampler

log = logging.getLogger(__name__)


def graph_sizes(max_bs: int) -> list[int]:
    return sorted({s for s in (1, 2, 4, 8, *range(16, max_bs + 1, 16)) if s <= max_bs} | {max_bs})


def graph_size(sizes: list[int], batch: Batch) -> int:
    """The graph a step replays (its rows padded to that size), or 0: not a decode graph's (piecewise graphs or
    eager). A graph computes one token per row and samples every row, so a step with a prompt chunk, even of one
    token that does not sample, is not one."""
    if not sizes or len(batch) > sizes[-1] or max(batch.num_new_tokens) != 1 or not all(batch.sample):
        return 0
    return next(s for s in sizes if s >= len(batch))


class CudaGraphs:
    def __init__(self, model: Any, backend: GraphAttentionBackend, sampler: Sampler, tables: RowTables,
                 sampled: torch.Tensor, max_bs: int, block_size: int, max_model_len: int,
                 warmup_stream: torch.cuda.Stream, time_decode: bool = False) -> None:
        # no reference back to the runner: a runner <-> graphs cycle would keep the GPU memory until a gc pass
        self.model, self.backend, self.sampler, self.tables, self.sampled = model, backend, sampler, tables, sampled
        self.block_size, self.max_model_len = block_size, max_model_len
        self.sizes = graph_sizes(max_bs)
        dev = sampled.device
        self.inputs = torch.zeros(3 * even(max_bs), dtype=torch.int64, device=dev)  # ids | positions | rows
        self.arange = torch.arange(max_bs + 1, device=dev)
        vocab = model.config.vocab_size
        self.logits = torch.zeros(max_bs, vocab, dtype=next(model.parameters()).dtype, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup = warmup_stream
        # GPU time of the largest forward graph (ms; time_decode): a decode step's before any is measured (0: not timed)
        self.decode_ms = 0.0
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
                self._capture(bs)
                if time_decode and not self.decode_ms:
                    self.decode_ms = self._time_forward(bs)
        log.info("captured CUDA graphs (forward and sampling) for decode batch sizes %s", self.sizes)

    def _views(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids, positions, rows: laid out as the packed array's first three parts (each padded to even length)."""
        e = even(bs)
        return self.inputs[:bs], self.inputs[e : e + bs], self.inputs[2 * e : 2 * e + bs]

    def _forward(self, bs: int) -> None:
        ids, positions, rows = self._views(bs)
        fast = self.sampler.fused  # the GPU fast path's Triton kernels
        input_ids, slots, seq_lens, block_tables = decode_inputs(ids, positions, rows, self.tables, self.sampled,
                                                                 self.block_size, fused=fast)
        meta = AttentionMetadata(
            query_start_loc=self.arange[: bs + 1], seq_lens=seq_lens,
            block_tables=block_tables, slot_mapping=slots, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs, block_size=self.block_size)
        self.backend.plan_capture(meta)
        hidden = self.model(input_ids, positions)
        self.model.compute_logits(hidden, out=self.logits[:bs])

    def _sample(self, bs: int) -> None:
        _, positions, rows = self._views(bs)
        self.sampler(self.logits[:bs], rows, positions, out=self.sampled[:bs], position_offset=1)

    def _capture(self, bs: int) -> None:
        self.inputs.zero_()
        self._views(bs)[2].fill_(self.tables.dummy)  # warm-up and capture store no K/V
        graphs = []
        for body in (self._forward, self._sample):
            # warm-up (compiles the Triton kernels) off the capture, on one stream for all sizes: cuBLAS keeps a
            # workspace per stream it ever ran on (32 MiB on Hopper) for the life of the process
            self.warmup.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.warmup):
                body(bs)
            torch.cuda.current_stream().wait_stream(self.warmup)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                body(bs)
            graphs.append(graph)
        self.graphs[bs] = (graphs[0], graphs[1])

    def _time_forward(self, bs: int) -> float:
        """Replay the forward graph just captured (its plan and inputs as captured: one token of context per row, no
        K/V stored) and time it: the weights' read, which a decode step of a large model is made of."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph = self.graphs[bs][0]
        graph.replay()
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 3

    def release(self) -> None:
        for forward, sample in self.graphs.values():
            forward.reset()
            sample.reset()
        self.graphs.clear()
        torch.cuda.synchronize(self.sampled.device)

    def forward(self, step: Step) -> torch.Tensor:
        """Replay the forward graph of a padded decode step; returns its logits (a view of the static buffer)."""
        bs = step.header.num_seqs
        n = 3 * even(bs)
        self.inputs[:n].copy_(step.packed[:n])  # ids | positions | rows lead the packed array
        self.graphs[bs][0].replay()
        return self.logits[:bs]

    def sample(self, bs: int) -> None:
        """Replay the sampling graph: the sampled ids land in the runner's buffer, rows [0, bs)."""
        self.graphs[bs][1].replay()
