"""Triton kernels vs their torch references. On CPU they run under Triton's interpreter (small shapes); the same
tests run on CUDA with `pytest -m gpu` (tests/gpu/test_gpu_kernels.py reuses them at larger shapes)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported; a CUDA run sets it to 0

import pytest
import torch

triton = pytest.importorskip("triton")
import asyncllm_kernels as K  # noqa: E402

DEVICE = "cuda" if os.environ["TRITON_INTERPRET"] == "0" else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, cols", [(1, 64), (5, 96), (7, 576)])
def test_rmsnorm_with_and_without_residual(rows, cols, dtype):
    torch.manual_seed(0)
    x, w, res = rnd(rows, cols, dtype=dtype), rnd(cols, dtype=dtype), rnd(rows, cols, dtype=dtype)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-6), K.rms_norm_ref(x, w, 1e-6), atol=TOL[dtype], rtol=TOL[dtype])
    r1, r2 = res.clone(), res.clone()
    out, ref = K.rms_norm(x, w, 1e-6, residual=r1), K.rms_norm_ref(x, w, 1e-6, residual=r2)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(r1, r2, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_reduce_add_rms_norm_on_one_rank(dtype):
    """The fused TP kernel with a world of one (its cross-rank behaviour: tests/gpu, 2 and 4 GPUs): stages x in the
    given slot of the exchange buffer, reads the sum back, adds, normalises; each call's barrier counts one up."""
    torch.manual_seed(2)
    rows, cols, slot_elems = 5, 96, 5 * 96
    x, w, res = rnd(rows, cols, dtype=dtype), rnd(cols, dtype=dtype), rnd(rows, cols, dtype=dtype)
    exchange = torch.zeros(2 * slot_elems, dtype=dtype, device=DEVICE)
    signals = torch.zeros(K.MAX_ALL_REDUCE_PROGRAMS, dtype=torch.int32, device=DEVICE)
    ptrs = [torch.tensor([t.data_ptr()], dtype=torch.int64, device=DEVICE) for t in (exchange, signals)]
    r1, r2 = res.clone(), res.clone()
    for call in (1, 2):
        out = K.all_reduce_add_rms_norm(x, r1, w, 1e-6, *ptrs, slot_elems, slot_elems, 0)
        ref = K.rms_norm_ref(x, w, 1e-6, residual=r2)
        torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
        torch.testing.assert_close(r1, r2, atol=TOL[dtype], rtol=TOL[dtype])  # the interpreter rounds bf16 its way
        assert (signals[:rows] == call).all() and not signals[rows:].any()  # a program a row
    assert torch.equal(exchange[slot_elems:].view(rows, cols), x) and not exchange[:slot_elems].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, hq, hk, dim", [(3, 4, 2, 16), (9, 9, 3, 64)])
def test_rope_with_kv_store(tokens, hq, hk, dim, dtype):
    torch.manual_seed(1)
    from asyncllm.layers.rotary import RotaryEmbedding
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hq * dim, num_attention_heads=hq, head_dim=dim,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cache = RotaryEmbedding(cfg, dim, 512).cos_sin_cache.to(DEVICE)
    pos = torch.randint(0, 512, (tokens,), device=DEVICE)
    qkv = rnd(tokens, (hq + 2 * hk) * dim, dtype=dtype)  # the views the model passes: rows of the fused matmul
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([hq * dim, hk * dim, hk * dim], dim=-1))
    q_ref, k_ref = K.rope_ref(pos, q, k, cache)
    # q rotated in place, rotated k and v into the cache (padding slot skipped), k unchanged
    kv_cache, kv_ref = (torch.zeros(2, 8, 4, hk, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    slots = torch.randperm(32, device=DEVICE)[:tokens]
    slots[1] = -1
    k0 = k.clone()
    K.rope_store_kv(pos, q, k, v, cache, kv_cache, slots)
    K.store_kv_ref(k_ref, v, kv_ref, slots)
    torch.testing.assert_close(q, q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(kv_cache, kv_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(k, k0) and kv_cache.ne(0).any(dim=(0, 3, 4)).sum() == tokens - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, cols", [(1, 64), (5, 3000)])
def test_silu_and_mul(tokens, cols, dtype):
    x = rnd(tokens, 2 * cols, dtype=dtype) * 3
    torch.testing.assert_close(K.silu_and_mul(x), K.silu_and_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])


def test_store_kv_scatters_and_skips_padding():
    torch.manual_seed(2)
    cache, ref = torch.zeros(2, 6, 4, 2, 16, device=DEVICE), torch.zeros(2, 6, 4, 2, 16, device=DEVICE)
    k, v = rnd(5, 2, 16), rnd(5, 2, 16)
    slots = torch.tensor([3, 17, 0, -1, 22], device=DEVICE)
    K.store_kv(k, v, cache, slots)
    K.store_kv_ref(k, v, ref, slots)
    assert torch.equal(cache, ref) and cache[0].reshape(-1, 2, 16)[17].equal(k[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, hq, hk, dim, lens", [(4, 4, 2, 16, [1, 7, 33]), (16, 9, 3, 64, [600, 5]),
                                                         (16, 4, 1, 32, [2000])])
def test_paged_decode_attention(block_size, hq, hk, dim, lens, dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mis-evaluates bf16 tl.dot; bf16 runs on the GPU (pytest -m gpu)")
    torch.manual_seed(3)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = rnd(2, num_blocks, block_size, hk, dim, dtype=dtype)
    perm = torch.randperm(num_blocks, device=DEVICE)  # scattered, non-contiguous blocks
    width = max(-(-n // block_size) for n in lens)
    tables, used = torch.zeros(len(lens), width, dtype=torch.int32, device=DEVICE), 0
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = rnd(len(lens), hq, dim, dtype=dtype)
    ref = K.paged_decode_attention_ref(q, cache, tables, seq_lens, dim**-0.5)
    counters = K.decode_counters(q.device)
    for bound in (max(lens), 4 * max(lens)):  # one chunk per head, or several merged in the kernel (twice with
        for _ in range(2):                    # the same counters: the merging program resets them)
            out = K.paged_decode_attention(q, cache, tables, seq_lens, dim**-0.5, bound, counters)
            torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
            assert not counters.any()


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 1, 9, 1], [7, 12]])
def test_triton_backend_matches_torch_backend(q_lens):
    """Decode-only, mixed and prefill-only steps: the triton backend (paged kernel for decode rows, torch path for
    prefill rows) gives the torch backend's output and cache."""
    from asyncllm.layers.attention import AttentionMetadata, TorchAttentionBackend, TritonAttentionBackend

    torch.manual_seed(4)
    bs, hq, hk, dim = 4, 4, 2, 16
    ctx = [n + extra for n, extra in zip(q_lens, [6, 0, 13, 21])]
    tables = torch.tensor([[8 * b + j for j in range(8)] for b in range(len(q_lens))], device=DEVICE)
    slots = [int(tables[b, p // bs]) * bs + p % bs for b, (n, c) in enumerate(zip(q_lens, ctx)) for p in range(c - n, c)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEVICE),
        seq_lens=torch.tensor(ctx, device=DEVICE), block_tables=tables, slot_mapping=torch.tensor(slots, device=DEVICE),
        query_lens_cpu=q_lens, seq_lens_cpu=ctx, block_size=bs)
    cache = rnd(2, 8 * len(q_lens), bs, hk, dim)
    q, k, v = rnd(sum(q_lens), hq, dim), rnd(sum(q_lens), hk, dim), rnd(sum(q_lens), hk, dim)
    outs, caches = [], []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        c = cache.clone()
        backend.plan(meta)
        outs.append(backend.forward(q, k, v, c, dim**-0.5))
        caches.append(c)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_sample_follows_softmax_and_greedy_rows(dtype):
    """Frequencies of the fused sampler (one row per draw, each with its own Philox stream) match
    softmax(logits / T), as the torch reference's do; T = 0 gives the argmax; a seed fixes the draws."""
    torch.manual_seed(4)
    vocab = 6
    draws, tol = (600, 0.08) if DEVICE == "cpu" else (20000, 0.015)  # the interpreter runs ~80 rows/s
    logits = (torch.randn(1, vocab, device=DEVICE) * 1.5).to(dtype)
    temps = torch.tensor([0.7] * draws + [0.0] * 4, device=DEVICE)
    batch = logits.expand(draws + 4, vocab).contiguous()
    ids = K.gumbel_sample(batch, temps, seed=123).cpu()
    expected = (logits[0].float().cpu() / 0.7).softmax(-1)
    ref = K.gumbel_sample_ref(batch[:draws].cpu(), temps[:draws].cpu())
    for got in (ids[:draws], ref):
        freq = torch.bincount(got, minlength=vocab).float() / draws
        assert (freq - expected).abs().max() < tol, (freq, expected)
    assert (ids[draws:] == logits[0].float().argmax().cpu()).all()
    small = batch[draws - 20:]  # sampled and greedy rows
    # the noise is keyed by (seed, column): splitting the vocabulary into blocks must not change a single draw
    assert torch.equal(K.gumbel_sample(small, temps[draws - 20:], seed=5, block=2),
                       K.gumbel_sample(small, temps[draws - 20:], seed=5))
    assert not torch.equal(K.gumbel_sample(small, temps[draws - 20:], seed=5),
                           K.gumbel_sample(small, temps[draws - 20:], seed=6))

