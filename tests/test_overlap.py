"""Overlap scheduling (step N+1 scheduled before step N's tokens are read back) must not change any output.

On CPU the steps still run one after another, but the scheduler, the pending-token bookkeeping and the device-side
feed of sampled ids are the same code as on the GPU, so every case here compares overlap on with overlap off.
"""
from __future__ import annotations

import asyncio

import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams
from conftest import hf_greedy, make_tiny_model, random_prompts


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return str(tiny_models["qwen3"])


def run(model: str, prompts, params, overlap: bool, **config):
    llm = LLM(model, overlap_schedule=overlap, **config)
    outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    assert not engine.busy and not engine.scheduler.requests
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # free, or held only by the prefix cache
    return outs, engine


def test_overlap_greedy_matches_transformers(tiny_models):
    model = str(tiny_models["llama"])
    prompts = random_prompts(6, 512, 3, 40, seed=21)
    outs, _ = run(model, prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), True,
                  max_model_len=128)
    assert [o.token_ids for o in outs] == hf_greedy(tiny_models["llama"], prompts, 16)


def test_overlap_under_preemption_chunked_prefill_and_prefix_hits(qwen3):
    shared = random_prompts(1, 49152, 40, 40, seed=22)[0]
    prompts = [shared + p for p in random_prompts(12, 49152, 5, 50, seed=23)]
    params = [SamplingParams(temperature=0.0, max_tokens=10 + 3 * i, ignore_eos=True) for i in range(12)]
    config = dict(max_model_len=136, block_size=8, num_kv_blocks=30, max_num_batched_tokens=24)
    off, _ = run(qwen3, prompts, params, False, **config)
    on, engine = run(qwen3, prompts, params, True, **config)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert [o.finish_reason for o in on] == ["length"] * 12
    assert [len(o.token_ids) for o in on] == [p.max_tokens for p in params]  # no token past max_tokens
    stats = engine.scheduler.stats
    assert stats.num_preemptions > 0 and stats.cache_hits > 0


def test_penalty_counts_under_preemption_row_reuse_and_prefix_hits(qwen3):
    """Penalty counts live on the device per sampler row: penalized requests must give the tokens they give alone
    (ample memory, no prefix cache, no overlap) when they run together on a small cache with overlap (preempted
    and admitted again on other rows, rows reused by other requests, prompt prefixes from the cache, requests
    without penalties in between)."""
    shared = random_prompts(1, 49152, 32, 32, seed=41)[0]
    prompts = [shared + p for p in random_prompts(14, 49152, 4, 40, seed=42)]
    penalized = dict(temperature=0.0, ignore_eos=True, repetition_penalty=1.4, frequency_penalty=0.6,
                     presence_penalty=0.4)
    params = [SamplingParams(max_tokens=12 + 2 * i, **(penalized if i % 3 else dict(temperature=0.0, ignore_eos=True)))
              for i in range(14)]
    alone = [run(qwen3, [p], [sp], False, max_model_len=136, enable_prefix_caching=False)[0][0].token_ids
             for p, sp in zip(prompts, params)]
    config = dict(max_model_len=136, block_size=8, num_kv_blocks=30, max_num_batched_tokens=24)
    together, engine = run(qwen3, prompts, params, True, **config)
    assert [o.token_ids for o in together] == alone
    stats = engine.scheduler.stats
    assert stats.num_preemptions > 0 and stats.cache_hits > 0
    plain = run(qwen3, prompts[1:3], [SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
                                      for p in params[1:3]], True, max_model_len=136)[0]
    assert [o.token_ids for o in plain] != alone[1:3]  # the penalties change these outputs


def test_overlap_eos_stop_tokens_and_stop_strings(tmp_path, smollm2_dir):
    # a tiny model with a real tokenizer whose EOS is a token greedy decoding produces early
    probe_dir = make_tiny_model(tmp_path / "probe", "qwen3", tokenizer_from=smollm2_dir, seed=24)
    prompts = random_prompts(8, 1000, 4, 30, seed=25)
    [probe] = LLM(str(probe_dir), max_model_len=96).generate(
        [prompts[0]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    model = str(make_tiny_model(tmp_path / "eos", "qwen3", tokenizer_from=smollm2_dir, seed=24,
                                eos_token_id=probe.token_ids[3]))
    cases = [SamplingParams(temperature=0.0, max_tokens=24),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[probe.token_ids[1]]),
             SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[probe.text[-3:] or "e"])]
    for params in cases:
        off, _ = run(model, prompts, params, False, max_model_len=96)
        on, _ = run(model, prompts, params, True, max_model_len=96)
        assert [(o.token_ids, o.text, o.finish_reason) for o in on] == [(o.token_ids, o.text, o.finish_reason) for o in off]
    assert any(o.finish_reason == "stop" for o in on)


def test_overlap_penalties_and_seeded_sampling(qwen3):
    prompts = random_prompts(6, 49152, 5, 30, seed=26)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.5,
                             frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05, seed=8, max_tokens=20, ignore_eos=True,
                             repetition_penalty=1.3)] * 2
    off, _ = run(qwen3, prompts, params, False, max_model_len=128)
    on, _ = run(qwen3, prompts, params, True, max_model_len=128)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]


@pytest.mark.parametrize("on_loop", [False, True, "waited in the thread"])
async def test_async_engine_with_overlap_equals_without(qwen3, on_loop, monkeypatch):
    """The same tokens and texts with overlap and without, stop strings included (with overlap a stop string
    seen at delivery ends a request whose next step is already launched: nobody sees that token), with steps
    launched from the step thread (CPU) and from the loop thread (GPU: each step's tokens delivered after the next
    launch), its steps collected on the loop thread (finished when it gets there: the host is the slower side) or
    waited for in the step thread."""
    from asyncllm.engine.step_inputs import StepHandle

    monkeypatch.setattr(AsyncEngine, "launch_on_loop", bool(on_loop))
    if on_loop == "waited in the thread":
        monkeypatch.setattr(StepHandle, "finished", lambda self: False)
    prompts = random_prompts(24, 49152, 3, 60, seed=27)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = []
    for overlap in (False, True):
        async with AsyncEngine(qwen3, max_model_len=128, overlap_schedule=overlap) as engine:
            outs = [await engine.generate(p, params) for p in prompts[:2]]  # one at a time, then all at once
            outs += await asyncio.gather(*(engine.generate(p, params) for p in prompts[2:]))
            stops = [SamplingParams(temperature=0.0, max_tokens=12, stop=[o.text[k : k + 2]])
                     for k, o in enumerate(outs[:8]) if o.text[k : k + 2]]
            outs += await asyncio.gather(*(engine.generate(p, sp) for p, sp in zip(prompts, stops)))
            results.append([(o.token_ids, o.text, o.finish_reason) for o in outs])
            assert not engine.core.scheduler.requests and engine.num_free_blocks == engine.num_blocks
    assert any(r[2] == "stop" for r in results[0][24:])
    assert results[0] == results[1]
