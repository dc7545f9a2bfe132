"""Triton kernels, imported as `asyncllm_kernels` (a bare `kernels` would shadow the Hugging Face package).

Each kernel has a torch reference beside it (`*_ref`) that the tests compare against; on CPU the tests run the
kernels under Triton's interpreter (TRITON_INTERPRET=1). Shapes follow the engine: packed tokens [T, ...],
KV cache of one layer [2, num_blocks, block_size, kv_heads, head_dim].
"""
from asyncllm_kernels.activation import silu_and_mul, silu_and_mul_ref
from asyncllm_kernels.allreduce_norm import MAX_PROGRAMS as MAX_ALL_REDUCE_PROGRAMS
from asyncllm_kernels.allreduce_norm import all_reduce_add_rms_norm
from asyncllm_kernels.decode_inputs import decode_inputs
from asyncllm_kernels.kv_store import store_kv, store_kv_ref
from asyncllm_kernels.paged_attention import NEW_TOKEN_MIN_DIM, NewToken, decode_counters, paged_decode_attention, paged_decode_attention_ref
from asyncllm_kernels.rmsnorm import rms_norm, rms_norm_ref
from asyncllm_kernels.rope import rope_ref, rope_store_kv
from asyncllm_kernels.sampling import sample
from asyncllm_kernels.skinny_linear import MAX_ROWS as SKINNY_MAX_ROWS
from asyncllm_kernels.skinny_linear import skinny_linear, skinny_linear_ref
from asyncllm_kernels.token_mask import apply_token_bitmask_

__all__ = ["MAX_ALL_REDUCE_PROGRAMS", "NEW_TOKEN_MIN_DIM", "NewToken", "all_reduce_add_rms_norm", "apply_token_bitmask_", "decode_counters", "decode_inputs", "paged_decode_attention", "paged_decode_attention_ref", "rms_norm", "rms_norm_ref",
           "rope_ref", "rope_store_kv", "SKINNY_MAX_ROWS", "sample", "silu_and_mul", "silu_and_mul_ref", "skinny_linear", "skinny_linear_ref", "store_kv", "store_kv_ref"]
