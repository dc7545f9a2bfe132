"""Structured outputs (xgrammar): JSON schema, JSON object, regex, choice and EBNF grammars constrain the tokens;
unconstrained neighbours in the same batch are unchanged; bad grammars are refused."""
from __future__ import annotations

import json
import re

import pytest

from asyncllm import LLM, AsyncEngine, SamplingParams
from asyncllm.errors import InvalidRequestError
from asyncllm.sampling_params import StructuredOutputs
from conftest import TOKENIZER_IDS, make_byte_level_tokenizer, make_tiny_model, random_prompts

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}


def valid_person(obj: object) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age", "pets"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 20 and isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
            and isinstance(obj["pets"], list) and len(obj["pets"]) <= 3 and set(obj["pets"]) <= {"cat", "dog"})


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


@pytest.fixture(scope="module")
def prompt(llm):
    return llm.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])


def test_json_schema_from_sampled_and_greedy_tokens(llm, prompt):
    spec = StructuredOutputs(json=PERSON)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured_outputs=spec)
              for t, s in [(0.0, None), (1.0, 1), (1.5, 2), (1.0, 3)]]
    for out in llm.generate([prompt] * len(params), params, use_tqdm=False):
        assert out.finish_reason == "stop", out.text
        assert valid_person(json.loads(out.text)), out.text


def test_regex_choice_grammar_and_json_object(llm, prompt):
    cases = [
        (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (StructuredOutputs(choice=["yes", "no", 'maybe "so"']), lambda t: t in ("yes", "no", 'maybe "so"')),
        (StructuredOutputs(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'),
         lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
        (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, ok in cases:
        outs = llm.generate([prompt] * 2, [SamplingParams(temperature=0.7, seed=seed, max_tokens=100,
                                                          structured_outputs=spec) for seed in (1, 3)], use_tqdm=False)
        # every output that ends by itself is valid (a token the grammar refused would end it early, invalid);
        # this small model sometimes rambles inside an unconstrained object until max_tokens ("length")
        assert all(o.finish_reason == "length" or (o.finish_reason == "stop" and ok(o.text)) for o in outs), \
            (spec, [o.text for o in outs])
        assert any(o.finish_reason == "stop" for o in outs)


def test_unconstrained_neighbours_are_unchanged(llm, prompt):
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    alone = llm.generate([prompt, prompt], greedy, use_tqdm=False)
    masked = SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputs(regex="[a-z]+"))
    mixed = llm.generate([prompt, prompt, prompt], [greedy, masked, greedy], use_tqdm=False)
    assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in alone]
    assert re.fullmatch("[a-z]+", mixed[1].text)


def test_bad_grammars_are_refused(llm):
    for spec in (StructuredOutputs(regex="(unclosed"), StructuredOutputs(grammar="root ::= undefined_rule"),
                 StructuredOutputs(json='{"type": "object", "properties": 5}')):
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([[5, 6]], SamplingParams(structured_outputs=spec), use_tqdm=False)
        assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError):
        StructuredOutputs(choice=[])
    assert not llm.engine.scheduler.requests


@pytest.mark.parametrize("on_loop", [False, True])
async def test_overlap_scheduling_with_constrained_requests(prompt, on_loop, monkeypatch):
    """Under overlap a constrained request waits for its token before its next mask; the others run on (steps
    launched from the step thread, and from the loop thread as with a GPU)."""
    monkeypatch.setattr(AsyncEngine, "launch_on_loop", on_loop)
    async with AsyncEngine(max_model_len=512, overlap_schedule=True) as engine:
        spec = StructuredOutputs(json=PERSON)
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=120, structured_outputs=spec if i % 2 else None)
                  for i in range(6)]
        import asyncio

        outs = await asyncio.gather(*(engine.generate(prompt, p) for p in params))
        for i, out in enumerate(outs):
            if i % 2:
                assert out.finish_reason == "stop" and valid_person(json.loads(out.text)), out.text
        assert engine.num_free_blocks == engine.num_blocks


BOUNDED = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                            "tag": {"enum": ["a", "b", "c"]}},
           "required": ["n", "tag"], "additionalProperties": False}


def check_bounded_grammars(llm: LLM, vocab: int) -> None:
    """Grammars that end within a few tokens hold even for a random-weight model (it picks among the allowed
    tokens only); greedy neighbours in the same batches keep the tokens they get alone. (16 rows at most: on the GPU
    every decode step's narrow matmuls then take the few-row kernel, whose rows do not depend on each other; cuBLAS
    picks kernels by batch size, which may flip a near-tie of a random model's greedy token.)"""
    specs = [(StructuredOutputs(regex="[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
             (StructuredOutputs(choice=["left", "right", "up"]), lambda t: t in ("left", "right", "up")),
             (StructuredOutputs(json=BOUNDED), lambda t: set(json.loads(t)) == {"n", "tag"})]
    prompts = random_prompts(16, min(vocab, 300), 10, 100, seed=41)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(prompts[::2], greedy, use_tqdm=False)
    params = [greedy if i % 2 == 0 else SamplingParams(temperature=1.0, seed=i, max_tokens=64,
                                                       structured_outputs=specs[i // 2 % 3][0]) for i in range(16)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, out in enumerate(outs):
        if i % 2 == 0:
            assert out.token_ids == alone[i // 2].token_ids
        else:
            assert out.finish_reason == "stop" and specs[i // 2 % 3][1](out.text), out.text


def test_bounded_grammars_on_a_random_model_with_overlap(tmp_path):
    model = make_byte_level_tokenizer(make_tiny_model(tmp_path / "qwen3", "qwen3", **TOKENIZER_IDS))
    llm = LLM(str(model), max_model_len=256, block_size=8, overlap_schedule=True)
    assert llm.engine.overlap
    check_bounded_grammars(llm, 512)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    return make_byte_level_tokenizer(make_tiny_model(tmp_path_factory.mktemp("bytes") / "qwen3", "qwen3",
                                                     **TOKENIZER_IDS))


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("ASYNCLLM_RANDOM_SEEDS", 4)) // 4 or 1))
async def test_random_workloads_with_grammars_under_overlap(byte_model, seed, monkeypatch):
    """Overlap bookkeeping with constrained rows (steps launched in two parts), at random: bounded grammars,
    plain requests, log-probabilities, aborts, a KV cache small enough to preempt, steps launched from the step
    thread or from the loop thread (as with a GPU). Invariants: every constrained output that ends by itself is
    valid, every greedy plain output equals the one without overlap, log-probability ids follow the tokens, and
    every block comes back. ASYNCLLM_RANDOM_SEEDS=400 runs 100 workloads."""
    import asyncio
    import random

    rng = random.Random(seed)
    monkeypatch.setattr(AsyncEngine, "launch_on_loop", rng.random() < 0.5)
    # with steps launched from the loop: each collected on the loop thread, or waited for in the step thread
    from asyncllm.engine.step_inputs import StepHandle

    monkeypatch.setattr(StepHandle, "finished", lambda self: rng.random() < 0.5)
    specs = [(StructuredOutputs(regex="[0-9]{2,4}-[a-z]{1,3}"), lambda t: re.fullmatch("[0-9]{2,4}-[a-z]{1,3}", t)),
             (StructuredOutputs(choice=["alpha", "beta", "gamma delta"]), lambda t: t in ("alpha", "beta", "gamma delta")),
             (StructuredOutputs(json=BOUNDED), lambda t: set(json.loads(t)) == {"n", "tag"})]
    jobs = []
    for i in range(rng.randint(6, 14)):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 60))]
        kind = rng.choice(["grammar", "grammar", "plain", "logprobs"])
        spec = rng.choice(specs) if kind == "grammar" else None
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]) if kind == "grammar" else 0.0, seed=i,
                                max_tokens=rng.randint(20, 48), ignore_eos=kind != "grammar",
                                structured_outputs=spec[0] if spec else None,
                                logprobs=rng.choice([0, 3]) if kind == "logprobs" else None)
        jobs.append((prompt, params, spec, rng.random() < 0.15))
    reference = LLM(str(byte_model), max_model_len=128, block_size=8, overlap_schedule=False).generate(
        [p for p, *_ in jobs], [params for _, params, *_ in jobs], use_tqdm=False)
    async with AsyncEngine(str(byte_model), max_model_len=128, block_size=8, num_kv_blocks=40,
                           max_num_batched_tokens=rng.choice([16, 64]), overlap_schedule=True) as engine:
        async def run(prompt, params, abort):
            if not abort:
                return await engine.generate(prompt, params)
            async for _ in engine.stream(prompt, params):
                return None  # leaves after the first chunk: the request is aborted

        outs = await asyncio.gather(*(run(p, params, abort) for p, params, _, abort in jobs))
        for (prompt, params, spec, abort), out, ref in zip(jobs, outs, reference):
            if abort:
                continue
            if spec is not None and out.finish_reason == "stop":
                assert spec[1](out.text), out.text
            if spec is None:
                assert out.token_ids == ref.token_ids  # greedy, with or without overlap, preempted or not
            if params.logprobs is not None:
                assert [lp.token_id for lp in out.logprobs] == out.token_ids
        for _ in range(100):
            if engine.num_free_blocks == engine.num_blocks:
                break
            await asyncio.sleep(0.01)
        assert engine.num_free_blocks == engine.num_blocks


def test_handoff_thread_is_running_the_call_when_submit_returns():
    """With the interpreter's switch interval the grammar thread's fill must still run beside the caller's Python,
    not after it: `submit` returns only once the worker is inside the call (a woken thread otherwise waits for the
    busy caller's GIL, up to 5 ms)."""
    import threading

    from asyncllm.engine.grammar import HandoffThread

    worker = HandoffThread("test-handoff")
    worker.switch_interval = None
    try:
        for i in range(20):
            entered, release = threading.Event(), threading.Event()

            def call(i: int) -> int:
                entered.set()
                release.wait(10)
                return i

            future = worker.submit(call, i)
            assert entered.is_set()  # no yield since submit returned
            assert not future.done()
            release.set()
            assert future.result(10) == i
        with pytest.raises(ZeroDivisionError):
            worker.submit(lambda: 1 // 0).result(10)
    finally:
        worker.shutdown()


def test_short_grammar_calls_keep_the_gil(llm, prompt):
    """xgrammar's accept and the reads of its result keep the GIL (tvm-ffi lets it go around every call, and a
    thread taking it back beside a busy event loop waits up to 5 ms per call); the result is still read right."""
    pytest.importorskip("tvm_ffi")
    from asyncllm.engine.grammar import SHORT_FFI_CALLS, short_ffi_calls

    spec = StructuredOutputs(regex="[ab]{4}")
    [out] = llm.generate([prompt], SamplingParams(max_tokens=8, structured_outputs=spec), use_tqdm=False)
    assert re.fullmatch("[ab]{4}", out.text)
    calls = short_ffi_calls()
    assert len(calls) == len(SHORT_FFI_CALLS) and all(fn.release_gil is False for fn in calls)


def test_accept_tokens_advances_ends_and_refuses_row_by_row(llm):
    """One batch accept: a grammar that takes its stop token ends, one that refuses a token marks its request (it
    then stops), the others advance."""
    from types import SimpleNamespace

    from asyncllm.engine.grammar import accept_tokens

    grammars, tok = llm.engine.grammars, llm.engine.tokenizer
    [a], [c] = tok.encode("a", add_special_tokens=False), tok.encode("c", add_special_tokens=False)
    stop = grammars.stop_tokens[0]
    spec = StructuredOutputs(regex="[ab]{1,2}")
    reqs = [SimpleNamespace(grammar=grammars.matcher(spec), grammar_ended=False, grammar_refused=False,
                            grammar_stops=frozenset([stop]), request_id=str(i)) for i in range(4)]
    assert reqs[2].grammar.accept_token(a)
    batch = SimpleNamespace(requests=reqs + [SimpleNamespace(grammar=None)], sample=[True, True, True, False, True])
    accept_tokens(batch, [a, c, stop, 0])  # row 3 samples nothing; row 4 is unconstrained
    assert [(r.grammar_ended, r.grammar_refused) for r in reqs] == [(False, False), (False, True), (True, False),
                                                                    (False, False)]
    accept_tokens(batch, [a, a, a, 0])  # all accepted (the ended grammar is skipped): the flags stay
    assert [(r.grammar_ended, r.grammar_refused) for r in reqs] == [(False, False), (False, True), (True, False),
                                                                    (False, False)]
    assert not reqs[0].grammar.accept_token(a) and reqs[0].grammar.accept_token(stop)  # it holds "aa" now


def test_mask_fill_reads_which_grammars_ended_when_it_runs(llm):
    """A step's masks are made when it is queued (CUDA: behind a stream gate) but filled only once the step before
    was accepted: a grammar that ended with that token gets an allow-all row (its request ends), and the others
    their own grammar's mask."""
    import torch

    from asyncllm.engine.grammar import MaskFill
    from types import SimpleNamespace

    grammars = llm.engine.grammars
    spec = StructuredOutputs(regex="[ab]")
    reqs = [SimpleNamespace(grammar=grammars.matcher(spec), grammar_ended=False) for _ in range(2)]
    [a] = llm.engine.tokenizer.encode("a", add_special_tokens=False)
    for r in reqs:
        assert r.grammar.accept_token(a)
    fill = MaskFill(reqs, grammars.vocab_size, torch.tensor([0, 1]))
    assert reqs[0].grammar.accept_token(grammars.stop_tokens[0])  # the token accepted after the step was queued
    reqs[0].grammar_ended = True
    masks = fill.run()  # xgrammar refuses to fill the mask of a grammar that took its stop token
    assert (masks.bitmask[0] == -1).all()
    expected = torch.zeros_like(masks.bitmask[1:])
    reqs[1].grammar.fill_next_token_bitmask(expected)
    assert torch.equal(masks.bitmask[1:], expected) and not (expected == -1).all()


def test_grammar_thread_jobs_run_with_a_short_switch_interval():
    """While a grammar-thread job runs, a thread waiting for the GIL (the job's return, which opens a stream gate)
    waits at most the short interval; the interpreter's own comes back once no job runs."""
    import sys
    import threading

    from asyncllm.engine.grammar import HandoffThread

    before = sys.getswitchinterval()
    worker = HandoffThread("test-switch")
    try:
        release = threading.Event()
        seen = worker.submit(lambda: (release.wait(10), sys.getswitchinterval())[1])
        assert sys.getswitchinterval() == pytest.approx(HandoffThread.switch_interval)
        release.set()
        assert seen.result(10) == pytest.approx(HandoffThread.switch_interval)
        for _ in range(100):
            if sys.getswitchinterval() == before:
                break
            threading.Event().wait(0.01)
        assert sys.getswitchinterval() == before
    finally:
        worker.shutdown()
