"""The kernel tests of tests/test_kernels.py, compiled for CUDA (bf16 attention included)."""
import os

import pytest
import torch

if torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU; must precede the first import of triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    from test_kernels import (  # noqa: E402,F401  (collected again here, on the GPU)
        test_all_reduce_add_rms_norm_on_one_rank,
        test_decode_inputs_kernel_matches_the_torch_path,
        test_decode_kernel_rotates_and_stores_the_new_token,
        test_paged_decode_attention,
        test_rmsnorm_with_and_without_residual,
        test_rope_with_kv_store,
        test_sample_follows_the_kept_softmax,
        test_sample_matches_its_reference_on_every_path,
        test_sample_never_draws_a_masked_token,
        test_mlp_takes_the_skinny_matmul_for_few_rows_only,
        test_silu_and_mul,
        test_skinny_linear,
        test_store_kv_scatters_and_skips_padding,
        test_token_bitmask_bans_exactly_the_zero_bits_of_the_chosen_rows,
    )


@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("n, k, swiglu", [(4096, 1024, False), (1024, 3072, False), (3072, 1024, True),
                                          (4096, 14336, False)])
def test_skinny_linear_at_model_shapes(rows, n, k, swiglu):
    """Qwen3-0.6B's and Llama-3.1-8B's matmul shapes in bf16 (one and several K slices) against torch in float32."""
    import asyncllm_kernels as K

    torch.manual_seed(rows)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    w = (torch.randn(2 * n if swiglu else n, k, device="cuda") / k**0.5).bfloat16()
    ref = K.skinny_linear_ref(x.float(), w.float(), None, swiglu)
    out = K.skinny_linear(x, w, None, swiglu)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert torch.equal(K.skinny_linear(x, w, None, swiglu), out)


@pytest.mark.parametrize("block_size, hq, hk, dim, lens, qk_norm", [
    (16, 16, 8, 128, [1, 300, 4097], True),  # Qwen3-0.6B's heads (its q/k norms), one, several and many chunks
    (16, 32, 8, 128, [5000, 17], False),  # Llama-3.1-8B's
    (16, 9, 3, 64, [200, 1, 64], False),  # SmolLM2-135M's
])
def test_decode_kernel_rotates_and_stores_the_new_token_at_model_shapes(block_size, hq, hk, dim, lens, qk_norm):
    """The rotary embedding (with Qwen3's q/k norms) and the new token's KV store inside the decode kernel, in bf16,
    against rope_store_kv then the kernel."""
    from test_kernels import check_new_token_in_decode_kernel

    torch.manual_seed(hq)
    check_new_token_in_decode_kernel(block_size, hq, hk, dim, lens, torch.bfloat16, qk_norm, exact=False)


@pytest.mark.parametrize("rows", [1, 12])
def test_dependent_launch_chain_equals_the_serial_one(rows):
    """Decoder layers' chain of Triton kernels launched with programmatic dependent launch, eagerly and captured in a
    CUDA graph replayed on new inputs, gives bit for bit what the same chain gives launched without it: a kernel
    that read its input, or wrote, before the previous kernel was done would differ (Qwen3-0.6B's layer shapes; a
    torch kernel in the middle, both SwiGLU paths; every other layer with the rotary and the new token's store inside
    the decode kernel)."""
    import asyncllm_kernels as K
    from asyncllm_kernels.dependent_launch import supported

    if not supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9 or more")
    torch.manual_seed(rows)
    hidden, heads, kv_heads, dim, inter, bs, ctx, layers = 1024, 16, 8, 128, 3072, 16, 300, 6
    q_size, kv_size = heads * dim, kv_heads * dim

    def weight(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()

    wqkv, wo, wgu, wd = weight(q_size + 2 * kv_size, hidden), weight(hidden, q_size), weight(2 * inter, hidden), \
        weight(hidden, inter)
    norm_w, head_w = (1 + 0.1 * torch.randn(hidden, device="cuda")).bfloat16(), \
        (1 + 0.1 * torch.randn(dim, device="cuda")).bfloat16()
    per_row = -(-(ctx + 1) // bs)
    pristine = torch.randn(2, rows * per_row, bs, kv_heads, dim, device="cuda").bfloat16()
    cache = pristine.clone()
    tables = torch.arange(rows * per_row, device="cuda", dtype=torch.int32).view(rows, per_row)
    seq_lens = torch.full((rows,), ctx + 1, device="cuda", dtype=torch.int32)
    positions = torch.full((rows,), ctx, device="cuda", dtype=torch.int64)
    slots = (tables[:, ctx // bs].long() * bs + ctx % bs).contiguous()
    cos_sin = torch.randn(ctx + 1, dim, device="cuda")
    counters = K.decode_counters(torch.device("cuda"))

    def chain(x: torch.Tensor, residual: torch.Tensor, pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
        norm = (norm_w, 1e-6)  # rms_norm adds into `residual` in place
        for layer in range(layers):
            qkv = K.skinny_linear(K.rms_norm(x, *norm, residual=residual, pdl=pdl), wqkv, pdl=pdl)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k, v = q.view(rows, heads, dim), k.view(rows, kv_heads, dim), v.view(rows, kv_heads, dim)
            new = None
            if layer % 2:  # rotated and stored by the decode kernel
                new = K.NewToken(k, v, positions, slots, cos_sin, head_w, head_w, 1e-6)
            else:
                K.rope_store_kv(positions, q, k, v, cos_sin, cache, slots, head_w, head_w, 1e-6, pdl=pdl)
            a = K.paged_decode_attention(q, cache, tables, seq_lens, dim**-0.5, ctx + 1, counters, pdl=pdl, new=new)
            h = K.rms_norm(K.skinny_linear(a.view(rows, q_size), wo, pdl=pdl), *norm, residual=residual, pdl=pdl)
            if layer % 2:
                x = K.skinny_linear(K.skinny_linear(h, wgu, swiglu=True, pdl=pdl), wd, pdl=pdl)
            else:
                fused = K.skinny_linear(h, wgu, swiglu=True, pdl=pdl)
                unfused = K.silu_and_mul(K.skinny_linear(h, wgu, pdl=pdl), pdl=pdl)
                x = K.skinny_linear(fused + unfused, wd, pdl=pdl)  # the add: a torch kernel between PDL ones
        return x, residual

    def run(x: torch.Tensor, residual: torch.Tensor, pdl: bool) -> tuple[torch.Tensor, ...]:
        cache.copy_(pristine)
        return *chain(x.clone(), residual.clone(), pdl), cache.clone()

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, hidden, device="cuda").bfloat16(), torch.randn(rows, hidden, device="cuda").bfloat16()

    x0, r0 = inputs()
    serial = run(x0, r0, pdl=False)
    for got, want in zip(run(x0, r0, pdl=True), serial):  # eager (and every kernel compiled before the capture)
        assert torch.equal(got, want)
    static_x, static_res = x0.clone(), r0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_res_out = chain(static_x, static_res, pdl=True)
    for _ in range(4):
        x, residual = inputs()
        want = run(x, residual, pdl=False)
        static_x.copy_(x)
        static_res.copy_(residual)
        cache.copy_(pristine)
        graph.replay()
        for got, expected in zip((static_out, static_res_out, cache), want):
            assert torch.equal(got, expected)
