"""Workload 5 of BENCHMARKS.md: each Triton kernel vs its PyTorch eager reference on the same inputs, at decode-
and prefill-sized shapes, with the fraction of the measured copy bandwidth. GPU only. One JSON line per result.
    python tools/bench_kernels.py [--bandwidth-tbs 2.99] [--kernels rope_kv_store kv_store ...]
"""
from __future__ import annotations

import argparse
import json

import torch
from bench_common import run_fields
from triton.testing import do_bench

import asyncllm_kernels as K
from transformers import LlamaConfig

from asyncllm.layers.attention import AttentionMetadata, TorchAttentionBackend
from asyncllm.layers.rotary import RotaryEmbedding


def emit(**f):
    print(json.dumps(f), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="copy bandwidth; measured when omitted")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these (default: all)")
    a = ap.parse_args()
    dev, bf16 = "cuda", torch.bfloat16
    common = run_fields()
    if a.bandwidth_tbs is None:
        x = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        a.bandwidth_tbs = 2 * x.numel() / (do_bench(lambda: y.copy_(x)) * 1e-3) / 1e12
    emit(bench="kernels", metric="copy_bandwidth_tbs", value=round(a.bandwidth_tbs, 3), **common)
    bw = a.bandwidth_tbs * 1e12

    def report(kernel, shape, ours, ref, nbytes):
        if a.kernels and kernel.split("[")[0] not in a.kernels:
            return
        t_ours, t_ref = do_bench(ours) * 1e3, do_bench(ref) * 1e3  # microseconds
        emit(bench="kernels", kernel=kernel, shape=shape, triton_us=round(t_ours, 2), torch_eager_us=round(t_ref, 2),
             speedup=round(t_ref / t_ours, 2), bandwidth_fraction=round(nbytes / (t_ours * 1e-6) / bw, 3), **common)

    for tokens, hidden in ((1, 4096), (64, 4096), (16384, 4096), (32, 1024), (16384, 1024)):
        x, res = (torch.randn(tokens, hidden, device=dev, dtype=bf16) for _ in range(2))
        w = torch.randn(hidden, device=dev, dtype=bf16)
        report("add_rmsnorm", f"{tokens}x{hidden}", lambda: K.rms_norm(x, w, 1e-6, residual=res),
               lambda: K.rms_norm_ref(x, w, 1e-6, residual=res), 4 * x.numel() * 2)
    for tokens, hq, hk in ((1, 32, 8), (64, 32, 8), (16384, 32, 8), (256, 16, 8)):
        cfg = LlamaConfig(hidden_size=hq * 128, num_attention_heads=hq, head_dim=128)
        cache = RotaryEmbedding(cfg, 128, 32768).cos_sin_cache.to(dev)
        pos = torch.randint(0, 32768, (tokens,), device=dev)
        q, k, v = (torch.randn(tokens, h, 128, device=dev, dtype=bf16) for h in (hq, hk, hk))
        kv = torch.zeros(2, -(-tokens // 16), 16, hk, 128, device=dev, dtype=bf16)
        slots = torch.arange(tokens, device=dev)
        report("rope_kv_store", f"{tokens}x({hq}+{hk})x128", lambda: K.rope_store_kv(pos, q, k, v, cache, kv, slots),
               lambda: K.store_kv_ref(K.rope_ref(pos, q, k, cache)[1], v, kv, slots),
               2 * (q.numel() + 2 * k.numel()) * 2)
    for tokens, inter in ((1, 14336), (64, 14336), (16384, 3584)):
        x = torch.randn(tokens, 2 * inter, device=dev, dtype=bf16)
        report("silu_and_mul", f"{tokens}x{inter}", lambda: K.silu_and_mul(x), lambda: K.silu_and_mul_ref(x),
               3 * tokens * inter * 2)
    for tokens in (1, 256, 16384):
        cache = torch.zeros(2, 8192, 16, 8, 128, device=dev, dtype=bf16)
        k, v = (torch.randn(tokens, 8, 128, device=dev, dtype=bf16) for _ in range(2))
        slots = torch.randperm(8192 * 16, device=dev)[:tokens]
        report("kv_store", f"{tokens}x8x128", lambda: K.store_kv(k, v, cache, slots),
               lambda: K.store_kv_ref(k, v, cache, slots), 2 * 2 * k.numel() * 2)
    for batch, ctx, hq, hk in ((1, 1024, 32, 8), (1, 8192, 32, 8), (32, 1024, 32, 8), (128, 2048, 16, 8)):
        bs = 16
        nb = batch * (ctx // bs)
        cache = torch.randn(2, nb, bs, hk, 128, device=dev, dtype=bf16)
        tables = torch.randperm(nb, device=dev).view(batch, ctx // bs).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(batch, hq, 128, device=dev, dtype=bf16)
        backend = TorchAttentionBackend()
        meta = AttentionMetadata(query_start_loc=torch.arange(batch + 1, device=dev), seq_lens=lens.long(),
                                 block_tables=tables.long(), slot_mapping=torch.full((batch,), 0, device=dev),
                                 query_lens_cpu=[1] * batch, seq_lens_cpu=[ctx] * batch, block_size=bs)
        backend.plan(meta)
        knew = torch.zeros(batch, hk, 128, device=dev, dtype=bf16)
        report("paged_decode_attention", f"b{batch} ctx{ctx} {hq}/{hk}x128",
               lambda: K.paged_decode_attention(q, cache, tables, lens, 128**-0.5, ctx),
               lambda: backend.forward(q, knew, knew, cache, 128**-0.5), 2 * batch * ctx * hk * 128 * 2)
    # sampling over the Qwen3 vocabulary (temperature; and top-p, found by bisection): kernel vs its torch reference
    from asyncllm.layers.sampler import sample_ref

    for batch in (1, 256):
        logits = torch.randn(batch, 151936, device=dev, dtype=bf16)
        full = lambda v, dt: torch.full((batch,), v, dtype=dt, device=dev)  # noqa: E731
        for name, top_p in (("temperature_sampling", 1.0), ("top_p_sampling", 0.9)):
            args = (full(0.6, torch.float32), full(0, torch.int64), full(top_p, torch.float32), full(0.0, torch.float32),
                    torch.arange(batch, device=dev), full(7, torch.int64))
            report(name, f"{batch}x151936", lambda: K.sample(logits, *args), lambda: sample_ref(logits, *args),
                   logits.numel() * 2)

if __name__ == "__main__":
    main()
