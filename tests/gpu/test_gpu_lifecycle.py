"""An engine's device memory goes back when it is closed or dropped: a second engine in the same process gets the
same KV cache capacity (the CUDA graphs hold no reference cycle to the runner).

What may stay: cuBLAS keeps one workspace per stream it ran on for the life of the process (32 MiB each on
Hopper): the engines' shared side stream and the graph-capture stream, hence LEFT, which must hold after every
engine."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from asyncllm import LLM, SamplingParams
from conftest import make_tiny_model

LEFT = 96 << 20  # bytes an engine may leave allocated after it is gone (cuBLAS workspaces, see above)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_second_engine_gets_the_same_kv_capacity(tmp_path):
    model_dir = make_tiny_model(tmp_path / "qwen3", "qwen3", dtype_name="bfloat16", vocab_size=2048, hidden_size=256,
                                intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)

    def build() -> LLM:
        return LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5)

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()

    def left() -> int:
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated() - base

    first = build()
    capacity = first.engine.blocks.num_blocks
    assert first.engine.runner.graphs is not None  # the path that used to hold a cycle
    tokens = first.generate([[5, 6, 7]] * 4, params, use_tqdm=False)[0].token_ids
    runner = weakref.ref(first.engine.runner)
    gc.disable()
    try:
        del first  # no gc pass: plain reference counting must free it
        assert runner() is None
    finally:
        gc.enable()
    after_del = left()
    assert after_del < LEFT
    second = build()
    print(f"KV blocks: first {capacity}, second {second.engine.blocks.num_blocks}; left after del {after_del >> 20} MiB")
    assert second.engine.blocks.num_blocks >= 0.99 * capacity
    assert second.generate([[5, 6, 7]], params, use_tqdm=False)[0].token_ids == tokens
    second.close()
    assert left() < LEFT
    with build() as third:
        assert third.engine.blocks.num_blocks >= 0.99 * capacity
    assert left() < LEFT  # nothing accumulates engine after engine
