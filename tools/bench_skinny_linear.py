"""The few-row matmul (asyncllm_kernels.skinny_linear) vs cuBLAS (torch.nn.functional.linear; + the SwiGLU kernel for
gate|up) at the layer shapes of SmolLM2-135M, Qwen3-0.6B, Llama-3.1-8B and its TP-4 shard and at LM heads (SmolLM2's
vocabulary, which the serving and structured-output benchmarks' bodies take, and Llama 3's), 1, 4 and 16 rows.
Implementations: `cublas` (torch.nn.functional.linear), `cublas_mm_out` (torch.mm into rows of a [256, N] buffer, as
the LM head of a graph step writes its logits; SwiGLU shapes as `cublas`), `skinny`. Each kernel is timed inside a
CUDA graph over copies of its weight that together exceed 150 MB, so no weight is read from L2 (a few-MB weight
timed alone sits in L2; Python-launched kernels this short measure the launch). µs per call, best of 5 replays.
GPU. One JSON line per (implementation, rows); `skinny_max_out` is the widest layer the engine gives the kernel
(asyncllm.layers.linear.SKINNY_MAX_OUT).
    python tools/bench_skinny_linear.py
"""
from __future__ import annotations

import json

import torch
from bench_common import run_fields

import asyncllm_kernels as K
from asyncllm.layers.linear import SKINNY_MAX_OUT

# name -> (output features, input features, SwiGLU)
SHAPES = {"S_qkv": (960, 576, False), "S_o": (576, 576, False), "S_gu": (1536, 576, True), "S_down": (576, 1536, False),
          "Q_qkv": (4096, 1024, False), "Q_o": (1024, 2048, False), "Q_gu": (3072, 1024, True),
          "Q_down": (1024, 3072, False), "L_qkv": (6144, 4096, False), "L_o": (4096, 4096, False),
          "L_gu": (14336, 4096, True), "L_down": (4096, 14336, False), "T_qkv": (1536, 4096, False),
          "T_o": (4096, 1024, False), "T_gu": (3584, 4096, True), "T_down": (4096, 3584, False),
          "S_lm": (49152, 576, False), "Q_lm": (49152, 1024, False), "L_lm": (49152, 4096, False),
          "L_lm128k": (128256, 4096, False)}


def graph_us(fn, calls: int) -> float:
    """µs per call of `fn` (which makes `calls` calls), replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / 5 / calls)
    return round(best, 2)


def main() -> None:
    dev, bf16 = "cuda", torch.bfloat16
    weights = {}
    for name, (n, k, swiglu) in SHAPES.items():
        rows = 2 * n if swiglu else n
        copies = max(2, -(-150_000_000 // (rows * k * 2)))
        weights[name] = [torch.randn(rows, k, device=dev, dtype=bf16) / k**0.5 for _ in range(copies)]
    for m in (1, 4, 16):
        xs = {k: torch.randn(m, k, device=dev, dtype=bf16) for k in {s[1] for s in SHAPES.values()}}
        for impl in ("cublas", "cublas_mm_out", "skinny"):
            out = {}
            for name, (n, k, swiglu) in SHAPES.items():
                x, ws = xs[k], weights[name]
                if impl == "skinny":
                    fn = lambda: [K.skinny_linear(x, w, None, swiglu) for w in ws]  # noqa: E731
                elif impl == "cublas_mm_out" and not swiglu:
                    buf = torch.empty(256, n, device=dev, dtype=bf16)
                    fn = lambda: [torch.mm(x, w.t(), out=buf[: len(x)]) for w in ws]  # noqa: E731
                elif swiglu:
                    fn = lambda: [K.silu_and_mul(torch.nn.functional.linear(x, w)) for w in ws]  # noqa: E731
                else:
                    fn = lambda: [torch.nn.functional.linear(x, w) for w in ws]  # noqa: E731
                out[name] = graph_us(fn, len(ws))
            print(json.dumps(dict(bench="skinny_vs_cublas", impl=impl, rows=m, skinny_max_out=SKINNY_MAX_OUT, **out,
                                  **run_fields())), flush=True)


if __name__ == "__main__":
    main()
