"""Steps with prompt tokens replayed from CUDA graphs, piece by piece.

A step that prefills (or mixes prompt chunks with decode rows, or has rows that do not sample) changes its token
count and attention layout every step, so no single graph fits it; run eagerly, its ~10 kernel launches per layer
cost the host more than a small model's GPU work. All of the model but attention depends only on the token count,
though. So, per padded token count T (`piece_sizes`), the forward is captured as L + 1 graphs cut at each layer's
attention:
  piece 0: embedding -> layer 0's norm, q|k|v, q/k norm + rotary + KV store (slots from a static buffer), q copied
           into a static buffer;
  piece i: layer i-1's o_proj, norm, MLP -> layer i's norm ... KV store, q copied out;
  piece L: the last layer's o_proj and MLP, the final norm -> hidden states [T, H].
Between pieces the attention backend runs eagerly on the step's real n <= T tokens (its one plan per step): static
q -> static output, which the next piece reads. A step writes its ids, positions and KV slots into static buffers;
padding rows take slot -1 (nothing stored) and compute rows nobody reads (every op but attention is row-wise).
Host cost per step: L + 1 graph launches and L attention calls instead of ~10 L launches.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from asyncllm.engine.step_inputs import StepInputs
from asyncllm.layers.attention import Attention, GraphAttentionBackend, Rotary, store_new_kv

log = logging.getLogger(__name__)

# steps of up to this many tokens x parameters (per rank) replay pieces by default (~5 ms of GPU matmuls at
# ~700 TFLOP/s, about what a small model's eager launches cost the host): past it the GPU work of a step
# outlasts its eager launches (~15 us each), which overlap scheduling then hides
PIECEWISE_PARAM_TOKENS = 1 << 41
# ... but pieces cover steps of up to this many tokens whatever the model's size (the default step budget): a large
# model's eager step costs the host far more than its launches' ~15 us each (Llama-3.1-8B on the H200: a fixed cost
# of several decode steps per step with prompt tokens eager, a fraction of one as pieces;
# docs/bench/step_trace_h200_c345789.jsonl)
MIN_PIECEWISE_TOKENS = 2048


def piece_sizes(max_tokens: int) -> list[int]:
    """Token counts captured: multiples of 16, four per doubling (a step pads at most 25%), up to max_tokens."""
    sizes, s = [], 16
    while s < max_tokens:
        sizes.append(s)
        s += max(16, 1 << (s.bit_length() - 3))
    return sizes + [-(-max_tokens // 16) * 16]


def default_max_tokens(max_step_tokens: int, params_per_rank: int, tp_size: int = 1) -> int:
    """0 (none) under tensor parallelism: pieces there (collectives in ~L graphs per size) have not run on several
    GPUs yet, and TP serves models large enough for the bound to leave few steps to them anyway."""
    if tp_size > 1:
        return 0
    return min(max_step_tokens, max(MIN_PIECEWISE_TOKENS, PIECEWISE_PARAM_TOKENS // max(params_per_rank, 1)))


class _Cut:
    """Stands in for the attention backend of every layer while the model is captured: stores the layer's K/V
    inside the current piece, copies q out, and (capturing) ends the piece and begins the next one."""

    def __init__(self, owner: PiecewiseGraphs, size: int, capture: bool) -> None:
        self.owner, self.size, self.capture = owner, size, capture
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.calls = 0  # attention layers met so far
        if capture:
            self._begin()

    def _begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.owner.pool)
        self.graphs.append(graph)

    def end(self) -> None:
        if self.capture:
            self.graphs[-1].capture_end()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
                rotary: Rotary | None = None) -> torch.Tensor:
        o, t = self.owner, self.size
        assert kv_cache is o.layers[self.calls][0], "attention layers ran out of module order"
        self.calls += 1
        store_new_kv(o.backend.kernels, q, k, v, kv_cache, o.slots[:t], rotary, o.backend.pdl)
        o.q[:t].copy_(q)
        if self.capture:
            self.end()
            self._begin()
        return o.out[:t]


class PiecewiseGraphs:
    def __init__(self, model: Any, backend: GraphAttentionBackend, layers: list[Attention], max_tokens: int,
                 stream: torch.cuda.Stream, time_tokens: bool = False) -> None:
        self.model, self.backend, self.attention = model, backend, layers
        self.max_tokens = max_tokens
        self.sizes = piece_sizes(max_tokens)
        top = self.sizes[-1]
        dev = next(model.parameters()).device
        attn = layers[0]
        self.ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=dev)
        dtype = next(model.parameters()).dtype
        self.q = torch.zeros(top, attn.num_heads, attn.head_dim, dtype=dtype, device=dev)
        self.out = torch.zeros(top, attn.num_heads, attn.head_dim, dtype=dtype, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph's stream when the decode graphs made it (one cuBLAS workspace for both), else our own
        self.capture_stream = getattr(torch.cuda.graph, "default_capture_stream", None) or torch.cuda.Stream(dev)
        # size -> (its L + 1 pieces, the hidden states the last one writes)
        self.pieces: dict[int, tuple[list[torch.cuda.CUDAGraph], torch.Tensor]] = {}
        # what attention i between pieces i and i + 1 reads: its layer's cache and scale (layers in call order)
        self.layers = [(layer.kv_cache, layer.scale) for layer in layers]
        t = time.perf_counter()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller ones reuse its pool memory
                self._capture(size, stream)
        self.capture_s = time.perf_counter() - t
        log.info("captured piecewise CUDA graphs (%d pieces each) for steps of up to %d tokens in %.1f s: %s",
                 len(layers) + 1, top, self.capture_s, self.sizes)
        # GPU ms per prompt token (time_tokens; 0: not timed): the pieces' replay time over their token count, from
        # the largest size and one a quarter of it; what a prompt token costs until steps are measured (attention
        # not included: it grows with the context, which the steps' own regression then sees)
        self.ms_per_token = self._time_tokens() if time_tokens and len(self.sizes) > 1 else 0.0

    def _time_tokens(self) -> float:
        top = self.sizes[-1]
        small = min(self.sizes, key=lambda s: abs(s - top // 4))
        if small == top:
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ms = {}
        with torch.cuda.stream(self.capture_stream):  # slots are all -1 after capture: nothing is stored
            for size in (top, small, top, small):  # the first round warms up
                start.record()
                for graph in self.pieces[size][0]:
                    graph.replay()
                end.record()
                end.synchronize()
                ms[size] = start.elapsed_time(end)
        return max((ms[top] - ms[small]) / (top - small), 0.0)

    def _run(self, size: int, capture: bool) -> tuple[_Cut, torch.Tensor]:
        cut = _Cut(self, size, capture)
        saved = [layer.backend for layer in self.attention]
        for layer in self.attention:
            layer.backend = cut  # type: ignore[assignment]
        try:
            hidden = self.model(self.ids[:size], self.positions[:size])
            cut.end()
        finally:
            for layer, backend in zip(self.attention, saved):
                layer.backend = backend
        return cut, hidden

    def _capture(self, size: int, warmup: torch.cuda.Stream) -> None:
        # warm-up (compiles the Triton variants of this size) on the steps' stream: cuBLAS keeps a workspace per
        # stream it ever ran on; the capture runs on a stream of its own, as torch.cuda.graph does
        warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup):
            self._run(size, capture=False)
        torch.cuda.synchronize()
        with torch.cuda.stream(self.capture_stream):
            cut, hidden = self._run(size, capture=True)
        torch.cuda.synchronize()
        assert len(cut.graphs) == len(self.attention) + 1, "a layer's attention was not cut"
        self.pieces[size] = (cut.graphs, hidden)

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [n, H] of the step's n tokens; the backend is planned for the step."""
        n = len(inputs.input_ids)
        size = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(inputs.meta.slot_mapping)
        self.slots[n:size].fill_(-1)
        graphs, hidden = self.pieces[size]
        q, out, attend = self.q[:n], self.out[:n], self.backend.attend
        for graph, (kv_cache, scale) in zip(graphs, self.layers):
            graph.replay()
            attend(q, kv_cache, scale, out)
        graphs[-1].replay()
        return hidden[:n]

    def release(self) -> None:
        for graphs, _ in self.pieces.values():
            for graph in graphs:
                graph.reset()
        self.pieces.clear()
