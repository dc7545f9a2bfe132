"""Batch invariance, chunked prefill and preemption: scheduling must never change a request's tokens."""
from __future__ import annotations

import pytest

from asyncllm import LLM, SamplingParams
from conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return str(tiny_models["qwen3"])


def test_alone_equals_in_batch_of_32(qwen3):
    prompts = random_prompts(32, 49152, 1, 120, seed=5)
    llm = LLM(qwen3, max_model_len=256, block_size=8)
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i in (0, 7, 31):
        [alone] = llm.generate([prompts[i]], GREEDY, use_tqdm=False)
        assert alone.token_ids == batched[i].token_ids
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_preemption_and_chunked_prefill_give_same_tokens(qwen3):
    prompts = random_prompts(12, 49152, 30, 90, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = LLM(qwen3, max_model_len=256).generate(prompts, params, use_tqdm=False)

    # 17 blocks of 8 = 136 tokens for 12 requests of up to 130 tokens each; 24-token step budget
    tight = LLM(qwen3, max_model_len=130, block_size=8, num_kv_blocks=17, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]
    engine = tight.engine
    assert engine.scheduler.stats.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.scheduler.requests


def test_seeded_sampling_survives_preemption(qwen3):
    prompts = random_prompts(8, 49152, 30, 60, seed=7)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=30, ignore_eos=True) for i in range(8)]
    roomy = LLM(qwen3, max_model_len=256).generate(prompts, params, use_tqdm=False)
    tight = LLM(qwen3, max_model_len=96, block_size=8, num_kv_blocks=14, max_num_batched_tokens=16)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.stats.num_preemptions > 0
    assert [o.token_ids for o in outs] == [r.token_ids for r in roomy]


def test_stop_conditions(qwen3):
    llm = LLM(qwen3, max_model_len=128)
    prompt = random_prompts(1, 49152, 10, 10, seed=8)[0]
    [free] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    [stopped] = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at]), use_tqdm=False
    )
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]
    # generation ends at max_model_len even when max_tokens would allow more
    [capped] = llm.generate([prompt * 11], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert capped.finish_reason == "length" and len(prompt * 11) + len(capped.token_ids) == 128


def test_eos_stops_unless_ignored(tmp_path, smollm2_dir):
    from conftest import make_tiny_model

    # a model whose EOS is the token greedy decoding picks first
    probe_dir = make_tiny_model(tmp_path / "probe", "qwen3", tokenizer_from=None, seed=9)
    prompt = random_prompts(1, 512, 6, 6, seed=9)[0]
    [probe] = LLM(str(probe_dir), max_model_len=64).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    eos = probe.token_ids[2]
    model_dir = make_tiny_model(tmp_path / "eos", "qwen3", tokenizer_from=None, seed=9, eos_token_id=eos)
    llm = LLM(str(model_dir), max_model_len=64)
    [out] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert out.token_ids == probe.token_ids[: probe.token_ids.index(eos) + 1]
    [ignored] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert ignored.token_ids == probe.token_ids
