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
