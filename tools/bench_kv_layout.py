"""The paged decode kernel (asyncllm_kernels.paged_decode_attention) on the KV cache's layout: token-major blocks
([blocks, block_size, Hk, D], the engine's: one token's heads contiguous, so a head's K of one token is a 2*D-byte
run every Hk*D*2 bytes) against head-major blocks ([blocks, Hk, block_size, D]: a head's tokens of one block are one
block_size*D*2-byte run), at several block sizes, with blocks scattered at random as after a while of serving.
Timed inside a CUDA graph over copies of the cache that together exceed 150 MB (a cache that fits in L2 would time
the L2), µs per call (best of 5 replays) and the KV bandwidth it reaches. GPU. One JSON line per (shape, layout).
    python tools/bench_kv_layout.py
"""
from __future__ import annotations

import json

import torch
from bench_common import run_fields
from bench_skinny_linear import graph_us

import asyncllm_kernels as K

# (batch, context, q heads, KV heads): Qwen3-0.6B's heads at the latency and offline benchmarks' batches, Llama-3.1-8B's
SHAPES = [(256, 256, 16, 8), (256, 160, 16, 8), (128, 1024, 16, 8), (128, 2048, 16, 8), (32, 1024, 32, 8),
          (1, 256, 16, 8), (1, 4096, 32, 8)]
LAYOUTS = [("token_major", 16), ("head_major", 16), ("head_major", 32), ("head_major", 64), ("token_major", 32)]
DIM = 128


def main() -> None:
    dev, bf16 = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    for batch, ctx, hq, hk in SHAPES:
        q = torch.randn(batch, hq, DIM, device=dev, dtype=bf16, generator=gen)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        kv_bytes = 2 * batch * ctx * hk * DIM * 2
        out = {}
        for layout, bs in LAYOUTS:
            per_seq = -(-ctx // bs)
            num_blocks = batch * per_seq + 8
            shape = (2, num_blocks, hk, bs, DIM) if layout == "head_major" else (2, num_blocks, bs, hk, DIM)
            copies = max(2, -(-150_000_000 // (num_blocks * bs * hk * DIM * 4)))
            caches = [torch.randn(shape, device=dev, dtype=bf16, generator=gen) for _ in range(copies)]
            tables = torch.randperm(num_blocks, device=dev, generator=gen)[: batch * per_seq].view(batch, per_seq).int()
            counters = K.decode_counters(q.device)
            fn = lambda: [K.paged_decode_attention(q, c, tables, lens, DIM**-0.5, ctx, counters,  # noqa: E731
                                                   head_major=layout == "head_major") for c in caches]
            us = graph_us(fn, len(caches))
            out[f"{layout}_bs{bs}"] = dict(us=us, tbs=round(kv_bytes / us / 1e6, 2))
            del caches
        print(json.dumps(dict(bench="paged_decode_kv_layout", shape=f"b{batch}c{ctx}h{hq}/{hk}", **out, **run_fields())),
              flush=True)


if __name__ == "__main__":
    main()
