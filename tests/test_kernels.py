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
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_with_kv_store(tokens, hq, hk, dim, dtype, qk_norm):
    """q (per-head RMS-normalized, Qwen3, and) rotated in place, k likewise into its cache slots with v."""
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
    norms = (rnd(dim, dtype=dtype), rnd(dim, dtype=dtype), 1e-6) if qk_norm else ()
    if qk_norm:  # eager Qwen3: each head normalized, then rotated
        q_ref, k_ref = K.rope_ref(pos, K.rms_norm_ref(q, norms[0], 1e-6), K.rms_norm_ref(k, norms[1], 1e-6), cache)
    else:
        q_ref, k_ref = K.rope_ref(pos, q, k, cache)
    # q rotated in place, rotated k and v into the cache (padding slot skipped), k unchanged
    kv_cache, kv_ref = (torch.zeros(2, 8, 4, hk, dim, dtype=dtype, device=DEVICE) for _ in range(2))
    slots = torch.randperm(32, device=DEVICE)[:tokens]
    slots[1] = -1
    k0 = k.clone()
    K.rope_store_kv(pos, q, k, v, cache, kv_cache, slots, *norms)
    K.store_kv_ref(k_ref, v, kv_ref, slots)
    torch.testing.assert_close(q, q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(kv_cache, kv_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(k, k0) and kv_cache.ne(0).any(dim=(0, 3, 4)).sum() == tokens - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, cols", [(1, 64), (5, 3000)])
def test_silu_and_mul(tokens, cols, dtype):
    x = rnd(tokens, 2 * cols, dtype=dtype) * 3
    torch.testing.assert_close(K.silu_and_mul(x), K.silu_and_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n, k", [(1, 40, 1100), (5, 33, 300), (16, 70, 2100)])  # one and several K slices
@pytest.mark.parametrize("bias, swiglu", [(False, False), (True, False), (False, True), (True, True)])
def test_skinny_linear(rows, n, k, bias, swiglu, dtype):
    torch.manual_seed(rows + n)
    out_rows = 2 * n if swiglu else n
    x, w = rnd(rows, k, dtype=dtype), rnd(out_rows, k, dtype=dtype) / k**0.5
    b = rnd(out_rows, dtype=dtype) if bias else None
    ref = K.skinny_linear_ref(x.float(), w.float(), b.float() if bias else None, swiglu)
    first = K.skinny_linear(x, w, b, swiglu)
    assert first.shape == (rows, n) and first.dtype == dtype
    torch.testing.assert_close(first.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(K.skinny_linear(x, w, b, swiglu), first)  # counters reset, partials summed in a fixed order


def test_mlp_takes_the_skinny_matmul_for_few_rows_only(monkeypatch):
    """With `skinny` on, an MLP of up to SKINNY_MAX_ROWS rows runs gate|up + SwiGLU and down by the few-row kernel
    (two calls) and gives the torch path's output; more rows, and layers wider than SKINNY_MAX_OUT, go to torch."""
    from transformers import LlamaConfig

    from asyncllm.layers import kernel_choice, linear
    from asyncllm.models.llama import DecoderMLP

    assert linear.SKINNY_MAX_ROWS == K.SKINNY_MAX_ROWS
    torch.manual_seed(6)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, mlp_bias=True)
    with kernel_choice.choose(kernel_choice.KernelChoice(skinny_matmul=True)):  # chosen as the layers are built
        mlp = DecoderMLP(cfg).to(DEVICE)
        wide = linear.RowParallelLinear(64, linear.SKINNY_MAX_OUT + 1)  # cuBLAS is faster there (measured)
    plain = DecoderMLP(cfg).to(DEVICE)
    assert mlp.gate_up_proj.skinny and mlp.down_proj.skinny and not plain.gate_up_proj.skinny and not wide.skinny
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.2)
    plain.load_state_dict(mlp.state_dict())
    calls = []
    monkeypatch.setattr(K, "skinny_linear", lambda *a, swiglu=False, pdl=False: calls.append(
        {"swiglu": swiglu, "pdl": pdl}) or K.skinny_linear_ref(*a, swiglu=swiglu))
    for rows, expected in ((3, [{"swiglu": True}, {}]), (K.SKINNY_MAX_ROWS + 1, [])):
        x = rnd(rows, 64)
        calls.clear()
        torch.testing.assert_close(mlp(x), plain(x), atol=1e-5, rtol=1e-5)
        assert [{k: v for k, v in c.items() if v} for c in calls] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, width", [(37, 2), (2100, 66), (1025, 40)])  # width > ceil(V/32): padded words
def test_token_bitmask_bans_exactly_the_zero_bits_of_the_chosen_rows(vocab, width, dtype):
    from asyncllm.engine.grammar import apply_bitmask_ref

    torch.manual_seed(4)
    logits = rnd(5, vocab, dtype=dtype)
    rows = torch.tensor([3, 0, 4], device=DEVICE)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, width), dtype=torch.int32, device=DEVICE)
    bitmask[1] = -1  # a row that allows every token
    out, ref = logits.clone(), logits.clone()
    K.apply_token_bitmask_(out, rows, bitmask)
    apply_bitmask_ref(ref, rows, bitmask)
    assert torch.equal(out, ref)
    bits = [(int(bitmask[i, v // 32]) >> (v % 32)) & 1 for i in range(3) for v in range(vocab)]
    banned = torch.tensor(bits, device=DEVICE).view(3, vocab) == 0
    assert torch.equal(torch.isinf(out[rows]), banned) and banned.any() and not banned[1].any()
    assert torch.equal(out[[1, 2]], logits[[1, 2]])  # rows without a mask are untouched


def test_store_kv_scatters_and_skips_padding():
    torch.manual_seed(2)
    cache, ref = torch.zeros(2, 6, 4, 2, 16, device=DEVICE), torch.zeros(2, 6, 4, 2, 16, device=DEVICE)
    k, v = rnd(5, 2, 16), rnd(5, 2, 16)
    slots = torch.tensor([3, 17, 0, -1, 22], device=DEVICE)
    K.store_kv(k, v, cache, slots)
    K.store_kv_ref(k, v, ref, slots)
    assert torch.equal(cache, ref) and cache[0].reshape(-1, 2, 16)[17].equal(k[1])


def decode_case(block_size: int, hq: int, hk: int, dim: int, lens: list[int], dtype: torch.dtype):
    """A paged cache with each sequence's blocks scattered, its block tables and lengths, and queries."""
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = rnd(2, num_blocks, block_size, hk, dim, dtype=dtype)
    perm = torch.randperm(num_blocks, device=DEVICE)  # scattered, non-contiguous blocks
    width = max(-(-n // block_size) for n in lens)
    tables, used = torch.zeros(len(lens), width, dtype=torch.int32, device=DEVICE), 0
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    return cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE), rnd(len(lens), hq, dim, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, hq, hk, dim, lens", [(4, 4, 2, 16, [1, 7, 33]), (16, 9, 3, 64, [600, 5]),
                                                         (16, 4, 1, 32, [2000])])
@pytest.mark.parametrize("config", ["few", "many"])  # the launch configuration of small and of large grids
def test_paged_decode_attention(block_size, hq, hk, dim, lens, dtype, config):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mis-evaluates bf16 tl.dot; bf16 runs on the GPU (pytest -m gpu)")
    from asyncllm_kernels import paged_attention

    chosen = paged_attention.FEW_PAIRS if config == "few" else paged_attention.MANY_PAIRS
    torch.manual_seed(3)
    cache, tables, seq_lens, q = decode_case(block_size, hq, hk, dim, lens, dtype)
    ref = K.paged_decode_attention_ref(q, cache, tables, seq_lens, dim**-0.5)
    counters = K.decode_counters(q.device)
    for bound in (max(lens), 4 * max(lens)):  # one chunk per head, or several merged in the kernel (twice with
        for _ in range(2):                    # the same counters: the merging program resets them)
            out = K.paged_decode_attention(q, cache, tables, seq_lens, dim**-0.5, bound, counters, chosen)
            torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
            assert not counters.any()


def check_new_token_in_decode_kernel(block_size: int, hq: int, hk: int, dim: int, lens: list[int],
                                     dtype: torch.dtype, qk_norm: bool, exact: bool) -> None:
    """paged_decode_attention(new=NewToken(...)) on unrotated q against rope_store_kv then the kernel: the same
    cache (a padding row's slot untouched) and output, bit for bit where `exact` (the GPU compiler may contract the
    two kernels' float ops differently), q untouched; with one chunk per head and with several."""
    from asyncllm.layers.rotary import RotaryEmbedding
    from transformers import LlamaConfig

    cache, tables, seq_lens, q = decode_case(block_size, hq, hk, dim, lens, dtype)
    cfg = LlamaConfig(hidden_size=hq * dim, num_attention_heads=hq, head_dim=dim)
    cos_sin = RotaryEmbedding(cfg, dim, max(lens)).cos_sin_cache.to(DEVICE)
    pos = (seq_lens - 1).long()
    slots = (tables.gather(1, (pos // block_size)[:, None]).squeeze(1).long() * block_size + pos % block_size)
    if len(lens) > 1:
        slots[1] = -1  # a captured graph's padding row: nothing stored
    kv = rnd(len(lens), 2 * hk * dim, dtype=dtype)  # rows of the fused q|k|v matmul's k|v
    k, v = (t.view(len(lens), hk, dim) for t in kv.split([hk * dim, hk * dim], dim=-1))
    norms = (1 + rnd(dim, dtype=dtype) / 4, 1 + rnd(dim, dtype=dtype) / 4, 1e-6) if qk_norm else (None, None, 0.0)
    counters = K.decode_counters(q.device)
    for bound in (max(lens), 4 * max(lens)):
        want_q, want_cache = q.clone(), cache.clone()
        K.rope_store_kv(pos, want_q, k, v, cos_sin, want_cache, slots, *norms)
        want = K.paged_decode_attention(want_q, want_cache, tables, seq_lens, dim**-0.5, bound, counters)
        got_q, got_cache = q.clone(), cache.clone()
        got = K.paged_decode_attention(got_q, got_cache, tables, seq_lens, dim**-0.5, bound, counters,
                                       new=K.NewToken(k, v, pos, slots, cos_sin, *norms))
        assert torch.equal(got_q, q) and not counters.any()
        if exact:
            assert torch.equal(got_cache, want_cache) and torch.equal(got, want)
        else:
            torch.testing.assert_close(got_cache, want_cache, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("block_size, hq, hk, dim, lens", [(4, 4, 2, 32, [1, 7, 33]), (16, 9, 3, 64, [600, 5])])
def test_decode_kernel_rotates_and_stores_the_new_token(block_size, hq, hk, dim, lens, qk_norm):
    torch.manual_seed(len(lens))  # the interpreter's bf16 dot is wrong (above): float32 there, bf16 on the GPU
    check_new_token_in_decode_kernel(block_size, hq, hk, dim, lens, torch.float32 if DEVICE == "cpu" else
                                     torch.bfloat16, qk_norm, exact=DEVICE == "cpu")


def test_decode_launch_config_is_the_one_measured_fastest_at_each_grid():
    """On the H200 (132 SMs, 228 KB of shared memory each; docs/bench/decode_attention_tuning_h200_1440ac1.jsonl):
    long tiles while the (sequence, KV head) pairs fit in one wave of resident programs, short ones beyond."""
    from asyncllm_kernels import paged_attention as P

    def config(batch: int, kv_heads: int, head_dim: int) -> str:
        chosen = P.launch_config(batch, kv_heads, head_dim, 2, 132, 228 * 1024)
        return {P.FEW_PAIRS: "few", P.MANY_PAIRS: "many"}[chosen]

    # Qwen3-0.6B's and Llama-3.1-8B's 8 KV heads of 128 dims; SmolLM2's 3 of 64
    assert [config(b, 8, 128) for b in (1, 16, 32, 256)] == ["few", "few", "many", "many"]
    assert [config(b, 3, 64) for b in (1, 128, 256)] == ["few", "few", "many"]
    # an SM that cannot hold the long tiles' stages (100 KB: RTX 4090, L4) takes the short ones even at batch 1
    assert P.launch_config(1, 8, 128, 2, 128, 100 * 1024) == P.MANY_PAIRS
    assert P.launch_config(1, 8, 64, 2, 128, 100 * 1024) == P.FEW_PAIRS


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 1, 9, 1], [7, 12]])
@pytest.mark.parametrize("rotary", [None, "rope", "qk_norm+rope"])
@pytest.mark.parametrize("dim", [16, 32])
def test_triton_backend_matches_torch_backend(q_lens, rotary, dim):
    """Decode-only, mixed and prefill-only steps: the triton backend (paged kernel for decode rows, torch path for
    prefill rows; rotary embedding and Qwen3's q/k norm fused with the KV store; decode-only steps planned as a
    decode graph's capture plans them) gives the torch backend's output and cache. At head_dim 32 its decode-only
    steps (3 sequences, within ROPE_IN_DECODE_MAX_SEQS) rotate and store inside the decode kernel; 16 is below
    the kernel's NEW_TOKEN_MIN_DIM: apart."""
    from transformers import LlamaConfig

    from asyncllm.layers.attention import AttentionMetadata, Rotary, TorchAttentionBackend, TritonAttentionBackend
    from asyncllm.layers.rotary import RotaryEmbedding

    torch.manual_seed(4)
    bs, hq, hk = 4, 4, 2
    ctx = [n + extra for n, extra in zip(q_lens, [6, 0, 13, 21])]
    tables = torch.tensor([[8 * b + j for j in range(8)] for b in range(len(q_lens))], device=DEVICE)
    slots = [int(tables[b, p // bs]) * bs + p % bs for b, (n, c) in enumerate(zip(q_lens, ctx)) for p in range(c - n, c)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEVICE),
        seq_lens=torch.tensor(ctx, device=DEVICE), block_tables=tables, slot_mapping=torch.tensor(slots, device=DEVICE),
        query_lens_cpu=q_lens, seq_lens_cpu=ctx, block_size=bs)
    cache = rnd(2, 8 * len(q_lens), bs, hk, dim)
    q, k, v = rnd(sum(q_lens), hq, dim), rnd(sum(q_lens), hk, dim), rnd(sum(q_lens), hk, dim)
    rot = None
    if rotary:
        cos_sin = RotaryEmbedding(LlamaConfig(hidden_size=hq * dim, num_attention_heads=hq, head_dim=dim), dim,
                                  64).cos_sin_cache.to(DEVICE)
        positions = torch.tensor([p % bs + 8 * (p // bs) % 64 for p in slots], device=DEVICE)
        norms = dict(q_norm=rnd(dim), k_norm=rnd(dim), eps=1e-6) if "qk_norm" in rotary else {}
        rot = Rotary(positions, cos_sin, **norms)
    outs, caches = [], []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        c = cache.clone()
        if isinstance(backend, TritonAttentionBackend) and max(q_lens) == 1:
            backend.plan_capture(meta)  # as a decode graph's capture plans it
        else:
            backend.plan(meta)
        outs.append(backend.forward(q.clone(), k, v, c, dim**-0.5, rot))
        caches.append(c)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    if rot is not None and rot.q_norm is not None:  # the norm's sums run in another order: not bit-exact
        torch.testing.assert_close(caches[1], caches[0], atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("batch, width", [(1, 3), (7, 40), (16, 1500)])
def test_decode_inputs_kernel_matches_the_torch_path(batch, width):
    """A decode graph's inputs from the one kernel equal the torch path's: fed pending ids, KV slots (-1 on the
    dummy row), lengths and the rows' tables."""
    from asyncllm.engine.step_inputs import RowTables, decode_inputs

    g = torch.Generator().manual_seed(batch)
    block_size, num_rows = 16, 9
    tables = RowTables(num_rows, width, torch.device(DEVICE))
    tables.device[:num_rows] = torch.randint(0, 10_000, (num_rows, width), generator=g).to(DEVICE)
    rows = torch.randint(0, num_rows + 1, (batch,), generator=g)
    rows[0] = tables.dummy  # a padded row
    positions = torch.randint(0, width * block_size, (batch,), generator=g)
    sampled = torch.randint(0, 50_000, (batch + 2,), generator=g)
    ids = torch.where(torch.rand(batch, generator=g) < 0.5, -1 - torch.randint(0, batch + 2, (batch,), generator=g),
                      torch.randint(0, 50_000, (batch,), generator=g))
    args = [t.to(DEVICE) for t in (ids, positions, rows)]
    got = decode_inputs(*args, tables, sampled.to(DEVICE), block_size, fused=True)
    want = decode_inputs(*args, tables, sampled.to(DEVICE), block_size, fused=False)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    assert int(got[1][0]) == -1 and torch.equal(got[0][ids < 0].cpu(), sampled[-1 - ids[ids < 0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_matches_its_reference_on_every_path(dtype):
    """The sampling kernel draws the same tokens as its torch reference (same hashed noise) for greedy,
    temperature, min-p, top-k, top-p and their mixes, rows of a batch each with their own parameters. On the GPU a
    row in a few hundred may differ: a token at a top-p / min-p threshold, where the kernel's fast exp/log and
    float32 sums and the reference's sorted cumulative sum round differently (a wrong parameter, seed or position
    would change most rows)."""
    from asyncllm.layers.sampler import sample_ref

    torch.manual_seed(5)
    rows, vocab = (24, 300) if DEVICE == "cpu" else (512, 49152)
    logits = (torch.randn(rows, vocab, device=DEVICE) * 3).to(dtype)
    g = torch.Generator().manual_seed(1)
    pick = lambda *options: torch.tensor(options)[torch.randint(len(options), (rows,), generator=g)]  # noqa: E731
    temp = pick(0.0, 0.5, 1.0, 1.7).float()
    top_k = pick(0, 0, 1, 3, 40, vocab + 5)
    top_p = pick(1.0, 1.0, 0.9, 0.5, 0.05).float()
    min_p = pick(0.0, 0.0, 0.1, 0.3).float()
    seed = torch.randint(-2**62, 2**62, (rows,), generator=g)
    pos = torch.randint(0, 5000, (rows,), generator=g)
    args = [t.to(DEVICE) for t in (temp, top_k, top_p, min_p, seed, pos)]
    got = K.sample(logits, *args).cpu()
    ref = sample_ref(logits.cpu(), temp, top_k, top_p, min_p, seed, pos)
    assert int((got != ref).sum()) <= (0 if DEVICE == "cpu" else rows // 200), (got != ref).nonzero()
    assert torch.equal(K.sample(logits, *args, chunk=128).cpu(), got)  # the vocabulary in chunks: the same draws
    # the parameters gathered by the kernel from tables of more rows (`rows`), the position given less an offset
    where = torch.randperm(rows + 3, generator=g)[:rows]
    tables = [torch.zeros(rows + 3, dtype=t.dtype, device=DEVICE).index_copy_(0, where.to(DEVICE), t) for t in args[:5]]
    out = torch.full((rows,), -1, dtype=torch.int64, device=DEVICE)
    K.sample(logits, *tables, args[5] - 2, out=out, chunk=128, rows=where.to(DEVICE), position_offset=2)
    assert torch.equal(out.cpu(), got)
    greedy = temp == 0
    assert torch.equal(got[greedy], logits.float().argmax(-1).cpu()[greedy])
    assert torch.equal(got[top_k == 1], logits.float().argmax(-1).cpu()[top_k == 1])


def test_sample_follows_the_kept_softmax():
    """Frequencies over many seeds: softmax(logits / T) restricted to the top-k / top-p / min-p survivors. On CPU
    the torch reference draws (the interpreter is slow; the test above pins the kernel to it)."""
    from asyncllm.layers.sampler import sample_ref

    vocab = 6
    draws, tol = 20000, 0.015
    sample = K.sample if DEVICE == "cuda" else sample_ref
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])).expand(draws, vocab).contiguous().to(DEVICE)
    # at T = 0.8 the probabilities are 0.460, 0.256, 0.135, 0.081, 0.043, 0.026
    for kw, keep in ((dict(), 6), (dict(top_k=3), 3), (dict(top_p=0.6), 2), (dict(min_p=0.25), 3)):
        full = lambda v, dt: torch.full((draws,), v, dtype=dt, device=DEVICE)  # noqa: E731
        ids = sample(logits, full(0.8, torch.float32), full(kw.get("top_k", 0), torch.int64),
                       full(kw.get("top_p", 1.0), torch.float32), full(kw.get("min_p", 0.0), torch.float32),
                       torch.arange(draws, device=DEVICE) * 1_000_003, full(7, torch.int64)).cpu()
        p = (logits[0].float().cpu() / 0.8).softmax(-1)[:keep]
        expected = torch.zeros(vocab)
        expected[:keep] = p / p.sum()
        freq = torch.bincount(ids, minlength=vocab).float() / draws
        assert (freq - expected).abs().max() < tol, (kw, freq, expected)


def test_sample_never_draws_a_masked_token():
    """Tokens at -inf (grammar masks, min_tokens) are never drawn, whatever the noise: the uniform numbers stay
    strictly inside (0, 1). (With 24-bit noise the largest value rounded to 1.0, whose Gumbel noise is +inf: that
    token won whatever its logit, about once per 340 draws over a 49k vocabulary.) ~100M noise values, in slices."""
    from asyncllm.layers.sampler import sample_ref

    vocab = 49152
    rows = 256 if DEVICE == "cpu" else 4096
    slices = 8 if DEVICE == "cpu" else 32
    sample = K.sample if DEVICE == "cuda" else sample_ref
    allowed = torch.tensor([5, 777, 40000])
    logits = torch.full((rows, vocab), float("-inf"), device=DEVICE)
    logits[:, allowed] = torch.tensor([1.0, 0.5, 0.0], device=DEVICE)
    full = lambda v, dt: torch.full((rows,), v, dtype=dt, device=DEVICE)  # noqa: E731
    for k in range(slices):
        ids = sample(logits, full(1.0, torch.float32), full(0, torch.int64), full(1.0, torch.float32),
                     full(0.0, torch.float32), full(k, torch.int64), torch.arange(rows, device=DEVICE)).cpu()
        assert bool(torch.isin(ids, allowed).all()), ids[~torch.isin(ids, allowed)]
