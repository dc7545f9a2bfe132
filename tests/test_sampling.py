"""Sampler behaviour: greedy, seeds, and the effect of temperature / top-k / top-p / min-p on the distribution."""
from __future__ import annotations

import pytest
import torch

from asyncllm import LLM, SamplingParams
from asyncllm.errors import InvalidRequestError
from asyncllm.layers.sampler import Sampler
from conftest import random_prompts


def draw(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, positions=None):
    """The CPU sampler (the kernel's torch reference) on rows of `logits`, parameters the same for every row."""
    n = logits.shape[0]
    sampler = Sampler(n, torch.device("cpu"), fused=False)
    fields = torch.zeros(n, 6, dtype=torch.int64)
    fields[:, 0] = torch.arange(n)
    fields[:, [1, 3, 4]] = torch.tensor([[float(temperature), float(top_p), float(min_p)]] * n,
                                        dtype=torch.float64).view(torch.int64)
    fields[:, 2] = top_k
    fields[:, 5] = torch.arange(n) * 7919 + 1 if seeds is None else seeds
    sampler.set_rows(fields)
    pos = torch.zeros(n, dtype=torch.int64) if positions is None else positions
    return sampler(logits, torch.arange(n), pos)


LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def frequencies(n=20000, **kw):
    tokens = draw(LOGITS.repeat(n, 1), **kw)
    return torch.bincount(tokens, minlength=5).float() / n


def test_plain_sampling_follows_probabilities():
    freq = frequencies()
    assert torch.allclose(freq, LOGITS.exp(), atol=0.015)


def test_temperature_sharpens_and_flattens():
    assert frequencies(temperature=0.5)[0] > 0.65  # p^2 renormalised: 0.25/0.3558 = 0.70
    assert frequencies(temperature=2.0)[0] < 0.40  # sqrt(p) renormalised: 0.707/2.07 = 0.34
    assert (frequencies(temperature=0.0)[0] == 1.0).item()


def test_top_k_top_p_min_p_cut_the_tail():
    f = frequencies(top_k=2)
    assert f[2:].sum() == 0 and abs(f[0] - 2 / 3) < 0.02
    f = frequencies(top_p=0.8)  # 0.5 + 0.25 < 0.8 -> keep three tokens
    assert f[3:].sum() == 0 and f[2] > 0.1
    f = frequencies(min_p=0.25)  # keep p >= 0.125: three tokens
    assert f[3:].sum() == 0 and f[2] > 0.1
    f = frequencies(min_p=0.4)  # keep p >= 0.2: two tokens
    assert f[2:].sum() == 0 and abs(f[0] - 2 / 3) < 0.02
    assert (frequencies(top_k=1)[0] == 1.0).item()


def test_draws_depend_on_seed_and_position_only():
    """A row's draw is keyed by (its seed, the position sampled): not by the rows beside it or their number."""
    logits = torch.randn(4, 1000)
    seeds, pos = torch.tensor([5, 6, 42, 8]), torch.tensor([3, 9, 17, 4])
    in_batch = draw(logits, seeds=seeds, positions=pos)
    alone = draw(logits[2:3], seeds=seeds[2:3], positions=pos[2:3])
    assert alone.item() == in_batch[2].item()
    many = [draw(logits[2:3], seeds=torch.tensor([42]), positions=torch.tensor([p])).item() for p in range(40)]
    assert len(set(many)) > 10  # new positions, new draws
    assert len({draw(logits[2:3], seeds=torch.tensor([s]), positions=pos[2:3]).item() for s in range(40)}) > 10


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"]), max_model_len=128)


def test_engine_seeded_runs_reproduce_and_top_k_1_is_greedy(llm):
    prompts = random_prompts(4, 49152, 5, 20, seed=11)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    a = llm.generate(prompts, params, use_tqdm=False)
    b = llm.generate(prompts[::-1], params, use_tqdm=False)[::-1]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    other = llm.generate(prompts, SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in other] != [o.token_ids for o in a]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(top_k=-5), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(logit_bias={5: 101.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(301)}), "logit_bias"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(seed=2**64), "seed"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(temperature="0.5"), "temperature"),
        (dict(top_p=None), "top_p"),
        (dict(repetition_penalty=[1.1]), "repetition_penalty"),
        (dict(stop=5), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids={1: 2}), "stop_token_ids"),
    ],
)
def test_invalid_params(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_none_and_tuples_for_list_params():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert p.stop == [] and p.stop_token_ids == []
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(3,))
    assert p.stop == ["a", "b"] and p.stop_token_ids == [3]


def test_penalties_shift_the_argmax():
    from asyncllm.layers.sampler import Penalties, PenaltyCounts, PenaltyRebuild

    logits = torch.tensor([[3.0, 2.5, -1.0, 0.0], [3.0, 2.5, -1.0, 0.0]])
    state = PenaltyCounts(3, 4, torch.device("cpu"))
    # sampler row 2 holds a request whose output has token 0 twice (the prompt: token 0 too)
    rebuild = PenaltyRebuild(torch.tensor([2]), torch.tensor([[2, 0], [2, 0]]), torch.tensor([[2, 0], [2, 0], [2, 0]]))
    pen = Penalties(state, rows=torch.tensor([1]), table_rows=torch.tensor([2]), presence=torch.tensor([0.3]),
                    frequency=torch.tensor([0.2]), repetition=torch.tensor([1.0]), rebuild=rebuild)
    out = pen.apply(logits.clone())
    assert torch.allclose(out[1], torch.tensor([3.0 - 0.3 - 0.4, 2.5, -1.0, 0.0]))
    assert torch.equal(out[0], logits[0])  # rows without penalties are untouched
    assert state.counts[:2].eq(0).all() and not state.seen[:2].any()  # other sampler rows are untouched
    pen.rebuild = None
    pen.record(torch.tensor([7, 2]))  # logit row 1 sampled token 2: counted from now on
    assert state.counts[2].tolist() == [2, 0, 1, 0] and state.seen[2].tolist() == [True, False, True, False]
    pen.repetition = torch.tensor([2.0])
    pen.presence, pen.frequency = torch.zeros(1), torch.zeros(1)
    assert torch.allclose(pen.apply(logits.clone())[1], torch.tensor([1.5, 2.5, -2.0, 0.0]))  # divide positive, multiply negative
    assert draw(pen.apply(logits.clone()), temperature=0.0).tolist() == [0, 1]
    pen.rebuild = PenaltyRebuild(torch.tensor([2]), torch.zeros(0, 2, dtype=torch.int64), torch.tensor([[2, 3]]))
    pen.apply(logits.clone())  # another request took the row: its counts start from its own tokens
    assert state.counts[2].tolist() == [0, 0, 0, 0] and state.seen[2].tolist() == [False, False, False, True]


def test_repetition_penalty_matches_transformers(tiny_models):
    from conftest import hf_greedy

    model_dir = tiny_models["qwen2"]
    prompts = random_prompts(3, 49152, 5, 30, seed=13)
    llm = LLM(str(model_dir), max_model_len=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.5), use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for out, p in zip(outs, prompts):
        x = torch.tensor([p])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                          repetition_penalty=1.5, pad_token_id=2)[0, len(p):].tolist()
        assert out.token_ids == ref
    assert [o.token_ids for o in outs] != [o.token_ids for o in plain]
    assert [o.token_ids for o in plain] == hf_greedy(model_dir, prompts, 20)
