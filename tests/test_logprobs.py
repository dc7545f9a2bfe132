"""Log-probabilities (sampled and prompt tokens), max_tokens=0, logit_bias and min_tokens, against transformers
in float32 on CPU."""
from __future__ import annotations

import pytest
import torch

from asyncllm import LLM, AsyncEngine, SamplingParams
from asyncllm.outputs import GenerateOutput, Logprob
from conftest import hf_logits, random_prompts

ATOL = 1e-4  # float32: our logits and transformers' differ by summation order only


@pytest.fixture(scope="module")
def qwen3(tiny_models):
    return str(tiny_models["qwen3"])


def reference(model_dir: str, out: GenerateOutput) -> torch.Tensor:
    """transformers' log-softmax [T, V] over prompt + output (row p predicts token p + 1)."""
    return hf_logits(model_dir, out.prompt_token_ids + out.token_ids).log_softmax(-1)


def check(lp: Logprob, ref_row: torch.Tensor, k: int) -> None:
    assert lp.logprob == pytest.approx(ref_row[lp.token_id].item(), abs=ATOL)
    assert len(lp.top) == k
    ids = [t for t, _ in lp.top]
    values = torch.tensor([v for _, v in lp.top])
    ref_values = ref_row.topk(k).values if k else torch.zeros(0)
    torch.testing.assert_close(values, ref_values, atol=ATOL, rtol=0)  # most likely first
    assert all(v == pytest.approx(ref_row[t].item(), abs=ATOL) for t, v in lp.top)
    assert len(set(ids)) == k


def check_output(model_dir: str, out: GenerateOutput, k: int, prompt_k: int | None) -> None:
    ref = reference(model_dir, out)
    p = len(out.prompt_token_ids)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for j, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token
        check(lp, ref[p - 1 + j], k)
    if prompt_k is None:
        assert out.prompt_logprobs is None
        return
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == p and out.prompt_logprobs[0] is None
    for q in range(1, p):
        lp = out.prompt_logprobs[q]
        assert lp is not None and lp.token_id == out.prompt_token_ids[q]
        check(lp, ref[q - 1], prompt_k)


@pytest.mark.parametrize("budget", [16, 2048])  # chunked prefill (chunks of 16 tokens) and whole prompts
def test_logprobs_match_transformers(qwen3, budget):
    prompts = random_prompts(5, 49152, 1, 40, seed=11)
    llm = LLM(qwen3, max_model_len=128, block_size=8, max_num_batched_tokens=budget)
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),  # none asked, in the same batch
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=20, prompt_logprobs=20)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, p in zip(outs, params):
        if p.logprobs is None:
            assert out.logprobs is None
        else:
            check_output(qwen3, out, p.logprobs, p.prompt_logprobs)
        if p.logprobs:  # greedy: the token is the most likely one
            assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]  # reporting changes no token


def test_logprobs_are_of_the_raw_distribution(qwen3):
    """Penalties, logit_bias, temperature and top-k change the draw, not the reported log-probabilities."""
    llm = LLM(qwen3, max_model_len=128, block_size=8)
    prompts = random_prompts(3, 49152, 5, 20, seed=12)
    params = [SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=8, ignore_eos=True, logprobs=2,
                             repetition_penalty=1.3, presence_penalty=0.5, logit_bias={7: 3.0}),
              SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, seed=4, max_tokens=8, ignore_eos=True,
                             logprobs=1, frequency_penalty=1.0)]
    for prompt, p in zip(prompts, params):
        [out] = llm.generate([prompt], p, use_tqdm=False)
        check_output(qwen3, out, p.logprobs, None)


def test_prompt_logprobs_with_max_tokens_0_and_the_prefix_cache(qwen3):
    """max_tokens=0 scores the prompt only; a prompt the prefix cache holds is still scored at every position."""
    llm = LLM(qwen3, max_model_len=128, block_size=8, max_num_batched_tokens=16)
    prompt = random_prompts(1, 49152, 40, 40, seed=13)[0]
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    cached = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert cached.num_cached_tokens > 0  # the prompt's blocks are in the cache
    for out in (first, again):
        assert out.token_ids == [] and out.finish_reason == "length" and out.text == ""
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert again.num_cached_tokens == 0  # scoring skips the cache
    assert [lp.logprob for lp in first.prompt_logprobs[1:]] == [lp.logprob for lp in again.prompt_logprobs[1:]]
    ref = hf_logits(qwen3, prompt).log_softmax(-1)
    for q in range(1, len(prompt)):
        check(first.prompt_logprobs[q], ref[q - 1], 2)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert llm.engine.stats.generation_tokens == 1  # the dropped tokens of max_tokens=0 are not counted


def test_logprobs_survive_preemption(qwen3):
    prompts = random_prompts(10, 49152, 30, 80, seed=14)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3, prompt_logprobs=1)
    roomy = LLM(qwen3, max_model_len=256, block_size=8).generate(prompts, params, use_tqdm=False)
    tight = LLM(qwen3, max_model_len=112, block_size=8, num_kv_blocks=16, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.stats.num_preemptions > 0
    for a, b in zip(outs, roomy):
        assert a.token_ids == b.token_ids
        assert [x.token_id for x in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs + a.prompt_logprobs[1:], b.logprobs + b.prompt_logprobs[1:]):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=ATOL)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_logit_bias_and_min_tokens(qwen3):
    llm = LLM(qwen3, max_model_len=128, block_size=8)
    prompt = random_prompts(1, 49152, 10, 10, seed=15)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    [plain] = llm.generate([prompt], greedy, use_tqdm=False)
    ref = hf_logits(qwen3, prompt).log_softmax(-1)[-1]
    first, second = ref.topk(2).indices.tolist()
    assert plain.token_ids[0] == first
    # a -100 bias on the greedy choice makes the runner-up win; +100 on a token makes it win every step
    [banned] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100.0}),
                            use_tqdm=False)
    assert banned.token_ids == [second]
    forced = SamplingParams(temperature=1.0, seed=1, max_tokens=5, ignore_eos=True, logit_bias={123: 100.0})
    assert llm.generate([prompt], forced, use_tqdm=False)[0].token_ids == [123] * 5
    # min_tokens: a stop token id is masked until that many tokens exist
    stop_at_once = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first])
    assert llm.generate([prompt], stop_at_once, use_tqdm=False)[0].token_ids == [first]
    held = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[first], min_tokens=3),
                        use_tqdm=False)[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]
    assert held.token_ids[0] == second
    # batch neighbours are unaffected
    outs = llm.generate([prompt, prompt], [SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100.0}),
                                           greedy], use_tqdm=False)
    assert outs[0].token_ids == [second] and outs[1].token_ids == plain.token_ids


def test_logit_bias_outside_the_vocabulary_is_refused(qwen3):
    from asyncllm.errors import InvalidRequestError

    llm = LLM(qwen3, max_model_len=128, block_size=8)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[5, 6]], SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    assert e.value.param == "logit_bias"


async def test_async_engine_streams_logprobs(qwen3):
    prompts = random_prompts(2, 49152, 5, 30, seed=16)
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    offline = LLM(qwen3, max_model_len=128, block_size=8).generate(prompts, params, use_tqdm=False)
    async with AsyncEngine(qwen3, max_model_len=128, block_size=8, stream_interval=2) as engine:
        for prompt, want in zip(prompts, offline):
            chunks = [c async for c in engine.stream(prompt, params)]
            assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
            assert chunks[0].prompt_logprobs is not None and all(c.prompt_logprobs is None for c in chunks[1:])
            out = await engine.generate(prompt, params)
            assert out.token_ids == want.token_ids == [t for c in chunks for t in c.token_ids]
            assert [x.token_id for c in chunks for x in c.logprobs] == out.token_ids
            for x, y in zip(out.logprobs + out.prompt_logprobs[1:], want.logprobs + want.prompt_logprobs[1:]):
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=ATOL)
            assert len(out.prompt_logprobs) == len(prompt)
        zero = await engine.generate(prompts[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
        assert zero.token_ids == [] and zero.finish_reason == "length" and len(zero.prompt_logprobs) == len(prompts[0])
