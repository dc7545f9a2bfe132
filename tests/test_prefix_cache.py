"""Prefix caching changes no output: cache on vs off, float32 CPU, greedy."""
from __future__ import annotations

import asyncio

import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams
from conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_models):
    return str(tiny_models["qwen3"])


def pair(model, **kw):
    return LLM(model, enable_prefix_caching=True, **kw), LLM(model, enable_prefix_caching=False, **kw)


def assert_drained(llm):
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # free, or held only by the cache
    blocks.clear_cache()
    assert len(blocks._free) == blocks.num_blocks


def test_shared_system_prompt(model):
    system = random_prompts(1, 49152, 100, 100, seed=31)[0]
    questions = random_prompts(12, 49152, 3, 20, seed=32)
    prompts = [system + q for q in questions]
    on, off = pair(model, max_model_len=256, block_size=8)
    first = on.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = on.generate(prompts[1:], GREEDY, use_tqdm=False)
    ref = off.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in ref]
    assert first[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 96 for o in rest)  # 12 whole blocks
    assert on.engine.scheduler.stats.cache_hits == 96 * 11
    assert_drained(on)


def test_multi_turn_chat_extends_the_last_turn(model):
    on, off = pair(model, max_model_len=512, block_size=8)
    history_on, history_off = random_prompts(1, 49152, 30, 30, seed=33)[0], None
    history_off = list(history_on)
    for turn, user in enumerate(random_prompts(5, 49152, 5, 15, seed=34)):
        [a] = on.generate([history_on + user], GREEDY, use_tqdm=False)
        [b] = off.generate([history_off + user], GREEDY, use_tqdm=False)
        assert a.token_ids == b.token_ids
        if turn:  # everything up to the last whole block of the previous turn is reused
            assert a.num_cached_tokens >= (len(history_on) // 8) * 8 - 8 > 0
        history_on = history_off = history_on + user + a.token_ids
    assert_drained(on)


def test_partial_block_prefixes_and_identical_prompts(model):
    base = random_prompts(1, 49152, 45, 45, seed=35)[0]
    prompts = [base[:k] + [7, 8, 9] for k in (13, 21, 29, 37, 45)] + [base, base, base[:16], base[:16]]
    on, off = pair(model, max_model_len=256, block_size=8)
    outs = [on.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [o.token_ids for o in off.generate(prompts, GREEDY, use_tqdm=False)]
    # an identical prompt is served from the cache except its last token; 16 tokens = 2 blocks -> 1 block reused
    assert outs[6].num_cached_tokens == 40 and outs[8].num_cached_tokens == 8
    assert_drained(on)


def test_a_repeated_request_adopts_its_cached_output_as_it_decodes(model, monkeypatch):
    """The same greedy request again (alone, then three at once): each adopts the first one's output blocks as it
    decodes (found after its last offered block, no walk from the root), and every output is the same."""
    from asyncllm.engine.radix_cache import RadixCache

    adopted = []
    follow = RadixCache.follow

    def counted(self, after, tokens):
        found = follow(self, after, tokens)
        adopted.append(len(found or ()))
        return found

    monkeypatch.setattr(RadixCache, "follow", counted)
    prompt = random_prompts(1, 49152, 20, 20, seed=41)[0]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    on, off = pair(model, max_model_len=256, block_size=8)
    [ref] = off.generate([prompt], params, use_tqdm=False)
    [first] = on.generate([prompt], params, use_tqdm=False)
    assert not any(adopted)
    again = on.generate([prompt], params, use_tqdm=False) + on.generate([prompt] * 3, params, use_tqdm=False)
    assert all(o.token_ids == ref.token_ids == first.token_ids for o in again)
    assert sum(adopted) >= (20 + 60) // 8 - 3  # the repeat's decoded blocks, at least
    on.engine.blocks.check_invariants()
    assert_drained(on)


def test_eviction_under_memory_pressure(model):
    system = random_prompts(1, 49152, 64, 64, seed=36)[0]
    prompts = [system + q for q in random_prompts(16, 49152, 5, 40, seed=37)] + random_prompts(8, 49152, 60, 90, seed=38)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    kw = dict(max_model_len=160, block_size=8, num_kv_blocks=40, max_num_batched_tokens=64)
    on, off = pair(model, **kw)
    outs = on.generate(prompts, params, use_tqdm=False)
    again = on.generate(prompts[::-1], params, use_tqdm=False)[::-1]
    ref = off.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref] == [o.token_ids for o in again]
    assert on.engine.scheduler.stats.num_preemptions > 0 and on.engine.scheduler.stats.cache_hits > 0
    assert_drained(on)


async def test_aborting_requests_that_share_blocks(model):
    system = random_prompts(1, 49152, 80, 80, seed=39)[0]
    prompts = [system + q for q in random_prompts(10, 49152, 4, 12, seed=40)]
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    async with AsyncEngine(model, max_model_len=512, block_size=8) as engine:
        ref = [await engine.generate(p, GREEDY) for p in prompts]
        started = [engine.stream(p, long) for p in prompts]
        firsts = await asyncio.gather(*(s.__anext__() for s in started))
        assert all(s.usage is None for s in firsts)
        for s in started[::2]:
            await s.aclose()  # abort half of the requests holding the shared system prompt
        outs = await asyncio.gather(*(engine.generate(p, GREEDY) for p in prompts))
        for s in started[1::2]:
            await s.aclose()
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        await asyncio.sleep(0.05)
        blocks = engine.core.blocks
        assert blocks.num_free_blocks == blocks.num_blocks and blocks.num_cached_blocks > 0
        blocks.clear_cache()
        assert len(blocks._free) == blocks.num_blocks


def test_cache_switch_names(model):
    assert not LLM(model, max_model_len=64, cache_type="naive").engine.blocks.cache
    assert LLM(model, max_model_len=64, enable_radix_cache=True).engine.blocks.cache is not None
    with pytest.raises(ValueError, match="cache_type"):
        LLM(model, max_model_len=64, cache_type="lru")


@pytest.mark.parametrize("seed", range(3))
def test_burst_with_shared_prefix_and_staggered_finishes(model, seed):
    """Requests sharing a system prompt prefilled in the same step, finishing at different times, in a small
    cache (the case that crashed: cached blocks hung under blocks their request did not hold)."""
    import random

    rng = random.Random(seed)
    system = random_prompts(1, 49152, 64, 64, seed=50 + seed)[0]
    prompts = [system + q for q in random_prompts(8, 49152, 3, 30, seed=60 + seed)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 60), ignore_eos=True) for _ in prompts]
    kw = dict(max_model_len=160, block_size=8, num_kv_blocks=40)
    on, off = pair(model, **kw)
    for _ in range(2):  # the second round finds the prefix cached
        outs = on.generate(prompts, params, use_tqdm=False)
        on.engine.scheduler.check_invariants()
    ref = off.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert_drained(on)
