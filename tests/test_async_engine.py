"""AsyncEngine: concurrency, cancellation frees KV blocks, stop strings, UTF-8, failures."""
from __future__ import annotations

import asyncio
import gc
import os

import pytest

from asyncllm import LLM, AsyncEngine, EngineDeadError, SamplingParams
from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.errors import InvalidRequestError
from conftest import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


async def all_blocks_free(engine: AsyncEngine, timeout: float = 2.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if engine.num_free_blocks == engine.num_blocks and not engine.core.scheduler.requests:
            return True
        await asyncio.sleep(0.01)
    return False


async def collect(engine, prompt, params):
    chunks = [c async for c in engine.stream(prompt, params)]
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks


async def test_64_concurrent_streams_equal_sequential_runs(tiny_models):
    prompts = random_prompts(8, 49152, 5, 60, seed=21)
    async with AsyncEngine(str(tiny_models["qwen3"]), max_model_len=256) as engine:
        sequential = [await collect(engine, p, GREEDY) for p in prompts]
        concurrent = await asyncio.gather(*(collect(engine, prompts[i % 8], GREEDY) for i in range(64)))
        for i, (text, ids, chunks) in enumerate(concurrent):
            assert (text, ids) == sequential[i % 8][:2]
            assert chunks[-1].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == len(prompts[i % 8])
        assert await all_blocks_free(engine)
    # and the same tokens as the synchronous API
    outs = LLM(str(tiny_models["qwen3"]), max_model_len=256).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [s[1] for s in sequential]


async def test_leaving_a_stream_early_frees_its_blocks(tiny_models):
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    prompt = random_prompts(1, 49152, 40, 40, seed=22)[0]
    async with AsyncEngine(str(tiny_models["llama"]), max_model_len=256) as engine:
        # break out of the loop
        async for chunk in engine.stream(prompt, long):
            break
        gc.collect()
        assert await all_blocks_free(engine)

        # cancel the consuming task mid-stream
        got = asyncio.Event()

        async def consume():
            async for _ in engine.stream(prompt, long):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        assert engine.num_free_blocks < engine.num_blocks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await all_blocks_free(engine)

        # explicit aclose, and abort by id while others run
        gen = engine.stream(prompt, long)
        first = await gen.__anext__()
        await gen.aclose()
        other = asyncio.create_task(collect(engine, prompt, GREEDY))
        gen2 = engine.stream(prompt, long)
        first = await gen2.__anext__()
        engine.abort(first.request_id)
        rest = [c async for c in gen2]
        assert rest[-1].finish_reason == "abort"
        text, ids, _ = await other
        assert len(ids) == 16
        assert await all_blocks_free(engine)


async def test_stop_strings_across_tokens(smollm2_dir):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    async with AsyncEngine(str(smollm2_dir), max_model_len=512) as engine:
        tok = engine.tokenizer
        text, ids, _ = await collect(engine, messages, SamplingParams(temperature=0.0, max_tokens=20))
        assert text == "The capital of France is Paris."
        pieces = [tok.decode([i]) for i in ids]
        assert "capital of" not in pieces and "l of Fr" not in "".join(pieces[:2])  # spans several tokens
        for stop, include, expected in [
            ("l of Fr", False, "The capita"),
            ("l of Fr", True, "The capital of Fr"),
            (["xyz", "ance is"], False, "The capital of Fr"),
            ("Paris.", False, "The capital of France is "),
        ]:
            params = SamplingParams(temperature=0.0, max_tokens=20, stop=stop, include_stop_str_in_output=include)
            got, _, chunks = await collect(engine, messages, params)
            assert got == expected
            assert chunks[-1].finish_reason == "stop"
            assert all(("l of Fr" not in c.text) or include for c in chunks)
        # a stop string that never matches changes nothing; the deltas add up to the whole text
        got, got_ids, _ = await collect(engine, messages, SamplingParams(temperature=0.0, max_tokens=20, stop=["zzz"]))
        assert got == text and got_ids == ids
        assert await all_blocks_free(engine)


def test_detokenizer_never_splits_utf8_characters(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Héllo wörld — 日本語のテキスト 🎉🚀 naïve café ∑∫"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok, [1, 2], SamplingParams())
    deltas = []
    for i in ids:
        detok.push(i)
        deltas.append(detok.take(final=False))
    deltas.append(detok.take(final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # a stop string made of multi-byte characters, spanning tokens
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["テキ"]))
    out = []
    for i in ids:
        stopped = detok.push(i)
        out.append(detok.take(final=stopped))
        if stopped:
            break
    assert "".join(out) == "Héllo wörld — 日本語の"


async def test_failed_step_ends_requests_with_an_error(tiny_models):
    engine = AsyncEngine(str(tiny_models["qwen2"]), max_model_len=128)
    await engine.start()
    try:
        def boom(batch):
            raise RuntimeError("device lost")

        engine.core.runner.launch = boom
        with pytest.raises(EngineDeadError, match="device lost"):
            await collect(engine, [5, 6, 7], GREEDY)
        assert not engine.healthy and "device lost" in str(engine.error)
        with pytest.raises(EngineDeadError):
            await collect(engine, [5, 6, 7], GREEDY)
    finally:
        await engine.shutdown()


async def test_generate_and_invalid_requests(tiny_models):
    async with AsyncEngine(str(tiny_models["qwen3"]), max_model_len=64) as engine:
        out = await engine.generate([5, 6, 7], GREEDY)
        assert len(out.token_ids) == 16 and out.finish_reason == "length" and out.prompt_token_ids == [5, 6, 7]
        with pytest.raises(ValueError, match="maximum context length is 64"):
            await engine.generate([5] * 60, SamplingParams(max_tokens=10))
        for bad in (None, 5, [None], [[5, 6]], {"role": "user"}, b"ab", [1.5]):
            with pytest.raises(InvalidRequestError, match="prompt"):  # a clear error, not a TypeError from inside
                await engine.generate(bad)  # type: ignore[arg-type]
        assert engine.healthy and await all_blocks_free(engine)


async def test_stream_interval_coalesces_tokens(tiny_models):
    """--stream-interval 4: the first token alone, then chunks of at least 4 tokens (the last may be shorter);
    same tokens and text as interval 1."""
    prompts = random_prompts(4, 49152, 5, 30, seed=23)
    params = SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True)
    async with AsyncEngine(str(tiny_models["llama"]), max_model_len=256) as one:
        ref = [await collect(one, p, params) for p in prompts]
    async with AsyncEngine(str(tiny_models["llama"]), max_model_len=256, stream_interval=4) as four:
        got = await asyncio.gather(*(collect(four, p, params) for p in prompts))
    for (text, ids, chunks), (ref_text, ref_ids, ref_chunks) in zip(got, ref):
        assert (text, ids) == (ref_text, ref_ids)
        sizes = [len(c.token_ids) for c in chunks]
        assert sizes[0] < 4 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 23 and len(sizes) <= 7


@pytest.mark.parametrize("seed", range(max(1, int(os.environ.get("ASYNCLLM_RANDOM_EXAMPLES", 300)) // 100)))
async def test_a_random_workload_keeps_every_promise(tiny_models, seed):
    """Random prompts sharing prefixes, lengths, sampling, stop strings and consumers that leave early, over a KV
    cache small enough for preemption and prefix-cache eviction: every stream that is read to its end gets exactly
    the tokens its finish reason says (greedy ones those of the request run alone), and afterwards every block is
    free and the scheduler's invariants hold."""
    import random

    rng = random.Random(seed)
    bases = random_prompts(4, 49152, 20, 70, seed=100 + seed)
    async with AsyncEngine(str(tiny_models["llama"]), max_model_len=160, max_num_seqs=12, num_kv_blocks=48,
                           block_size=4) as engine:
        jobs = []
        for _ in range(60):
            prompt = rng.choice(bases)[: rng.randint(5, 70)] + [rng.randrange(3, 49152) for _ in range(rng.randint(0, 20))]
            params = SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.7,
                                    temperature=rng.choice([0.0, 0.0, 1.0]), seed=rng.choice([None, 5]),
                                    stop=rng.choice([[], ["e"], ["the", "a b"]]))
            jobs.append((prompt, params, rng.choice([None, None, None, 0, 2])))  # leave after that many chunks

        async def run(prompt, params, leave_after):  # noqa: ANN001, ANN202
            chunks = []
            async for chunk in engine.stream(prompt, params):
                chunks.append(chunk)
                if leave_after is not None and len(chunks) > leave_after:
                    return None
            return chunks

        results = await asyncio.gather(*(run(*job) for job in jobs))
        for (prompt, params, _), chunks in zip(jobs, results):
            if chunks is None:
                continue
            last = chunks[-1]
            ids = [t for c in chunks for t in c.token_ids]
            assert last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens == len(prompt)
            if last.finish_reason == "length":
                assert len(ids) == params.max_tokens
            else:
                assert last.finish_reason == "stop" and len(ids) <= params.max_tokens
                assert params.stop or not params.ignore_eos  # a stop string or EOS ended it
            if params.temperature == 0.0 and last.finish_reason == "length" and not params.stop:
                alone = await engine.generate(prompt, params)
                assert alone.token_ids == ids
        assert await all_blocks_free(engine) and engine.healthy
        engine.core.scheduler.check_invariants()
        stats = engine.core.stats
        assert stats.num_preemptions and stats.cache_hits  # the workload reached preemption and the prefix cache
