"""Launch configurations of the paged decode kernel (asyncllm_kernels.paged_attention.LaunchConfig: BLOCK_N,
warps, stages, MIN_CHUNK), each at every grid size, at the shapes the benchmarks hit: Qwen3-0.6B's heads at batch
256 with short contexts (the latency benchmark's 128-384 tokens) and at the offline benchmark's longer ones,
Llama-3.1-8B's at batch 32 and 1, SmolLM2-135M's (head_dim 64) at batch 128-256 and 1. Timed inside a CUDA graph
over copies of the cache that together exceed 150 MB (blocks scattered at random), µs per call (best of 5 replays)
and the KV bandwidth reached. GPU. One JSON line per configuration.
    python tools/tune_decode_attention.py [--configs N] [--bound 8192]   (the first N configurations only; the
    grid sized by max_seq_len = BOUND, as the engine's graphs size it, instead of by each case's context)
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_common import run_fields
from bench_skinny_linear import graph_us

import asyncllm_kernels as K
from asyncllm_kernels import paged_attention as P

# (batch, context, q heads, KV heads, head_dim)
SHAPES = [(256, 160, 16, 8, 128), (256, 256, 16, 8, 128), (256, 384, 16, 8, 128), (128, 1024, 16, 8, 128),
          (128, 2048, 16, 8, 128), (32, 1024, 32, 8, 128), (1, 256, 16, 8, 128), (1, 4096, 32, 8, 128),
          (128, 256, 9, 3, 64), (256, 256, 9, 3, 64), (1, 256, 9, 3, 64)]
# (BLOCK_N, warps, stages, MIN_CHUNK); the first two are the kernel's own (few and many (sequence, KV head) pairs)
CONFIGS = [P.FEW_PAIRS, P.MANY_PAIRS, (64, 2, 3, 64), (64, 1, 2, 64), (32, 2, 3, 32), (32, 1, 2, 32),
           (128, 2, 2, 128), (64, 2, 2, 128), (32, 2, 2, 64), (128, 4, 2, 256), (128, 4, 2, 512)]
BLOCK_SIZE = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=len(CONFIGS))
    ap.add_argument("--bound", type=int, default=0, help="the max_seq_len bound the grid is sized by: 0 = each "
                    "case's context (as earlier runs); the engine's decode graphs pass max_model_len (8192 in "
                    "tools/bench_latency.py), which splits short contexts over more, mostly empty, programs")
    a = ap.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for batch, ctx, hq, hk, dim in SHAPES:
        per_seq = -(-ctx // BLOCK_SIZE)
        num_blocks = batch * per_seq + 8
        copies = max(2, -(-150_000_000 // (num_blocks * BLOCK_SIZE * hk * dim * 4)))
        caches = [torch.randn(2, num_blocks, BLOCK_SIZE, hk, dim, device=dev, dtype=bf16, generator=gen)
                  for _ in range(copies)]
        tables = torch.randperm(num_blocks, device=dev, generator=gen)[: batch * per_seq].view(batch, per_seq).int()
        q = torch.randn(batch, hq, dim, device=dev, dtype=bf16, generator=gen)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        cases.append((f"b{batch}c{ctx}h{hq}/{hk}d{dim}", 2 * batch * ctx * hk * dim * 2, q, caches, tables, lens))
    for config in map(P.LaunchConfig._make, CONFIGS[: a.configs]):
        out = {}
        for name, kv_bytes, q, caches, tables, lens in cases:
            counters = K.decode_counters(q.device)
            bound = a.bound or int(lens[0])
            fn = lambda: [K.paged_decode_attention(q, c, tables, lens, q.shape[-1] ** -0.5, bound,  # noqa: E731
                                                   counters, config) for c in caches]
            us = graph_us(fn, len(caches))
            out[name] = dict(us=us, tbs=round(kv_bytes / us / 1e6, 2))
        print(json.dumps(dict(bench="paged_decode_tuning", block_n_warps_stages_min_chunk=list(config),
                              bound=a.bound or "context", **out, **run_fields())), flush=True)


if __name__ == "__main__":
    main()
