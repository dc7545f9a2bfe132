"""The native grammar workers (asyncllm/engine/native_grammar.py): a job's accepts and masks equal xgrammar's own
calls made one by one, rows of ended grammars allow every token, refusals are reported, and the gate's word only
ever moves forward (randomized over grammars, row subsets and tickets; ASYNCLLM_RANDOM_SEEDS=60 runs more)."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

from asyncllm.engine.core import eos_token_ids, load_tokenizer
from asyncllm.engine.grammar import Grammars
from asyncllm.engine.native_grammar import GrammarWork
from asyncllm.model_files import resolve_model
from asyncllm.sampling_params import StructuredOutputs

SPECS = [StructuredOutputs(regex="[0-9]{2,6}-[a-z]{1,3}"), StructuredOutputs(choice=["left", "right", "up"]),
         StructuredOutputs(json={"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                                   "n": {"type": "integer"}},
                                 "required": ["name", "n"], "additionalProperties": False})]


@pytest.fixture(scope="module")
def grammars():
    model = resolve_model(None)
    tokenizer = load_tokenizer(model)
    return Grammars(tokenizer, len(tokenizer), eos_token_ids(model, tokenizer))


@pytest.fixture(scope="module")
def work():
    work = GrammarWork.make(3)
    if work is None:
        pytest.skip("no C compiler here")
    yield work
    work.close()


def allowed(bitmask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


@pytest.mark.parametrize("seed", range(int(os.environ.get("ASYNCLLM_RANDOM_SEEDS", 6)) // 3))
def test_jobs_accept_and_fill_like_xgrammar_one_call_at_a_time(grammars, work, seed):
    """Random requests advance along random allowed tokens; each step one job accepts the last tokens of some and
    fills the masks of some (in a shuffled row order); a twin matcher per request, advanced and filled with
    xgrammar's own per-matcher calls, gives the same masks; the gate's word ends at each job's ticket."""
    rng = random.Random(seed)
    vocab = grammars.vocab_size
    width = -(-vocab // 32)
    word = torch.zeros(1, dtype=torch.int32)
    for trial in range(3):
        reqs = []
        for i in range(rng.randint(1, 12)):
            spec = rng.choice(SPECS)
            matcher = grammars.matcher(spec)
            reqs.append(SimpleNamespace(grammar=matcher, grammar_handle=GrammarWork.handle(matcher),
                                        twin=grammars.matcher(spec), request_id=str(i), grammar_ended=False,
                                        grammar_refused=False, grammar_stops=frozenset(grammars.stop_tokens), last=None))
        ticket = 0
        word.zero_()
        for step in range(40):
            live = [r for r in reqs if not r.grammar_ended]
            if not live:
                break
            accept = [(r, r.last) for r in live if r.last is not None and rng.random() < 0.9]
            for r, t in accept:
                r.last = None
                r.grammar_ended = t in r.grammar_stops
                assert r.twin.accept_token(t)
            fill = [r for r in reqs if rng.random() < 0.8 and (r.last is None or r.grammar_ended)]
            rng.shuffle(fill)
            bitmask = torch.zeros((len(fill) + 2, width), dtype=torch.int32)
            ticket += rng.randint(1, 3)
            work.submit(accept, fill, bitmask, word.data_ptr(), ticket)
            work.finish()
            assert word.item() == ticket
            for row, r in enumerate(fill):
                if r.grammar_ended:
                    assert (bitmask[row] == -1).all()
                    continue
                expected = torch.zeros((1, width), dtype=torch.int32)
                r.twin.fill_next_token_bitmask(expected)
                assert torch.equal(bitmask[row], expected[0]), (trial, step, row)
                r.last = rng.choice(allowed(bitmask[row], vocab))
            assert not any(r.grammar_refused for r in reqs)
            assert (bitmask[len(fill):] == 0).all()  # rows past the job's are untouched


def test_a_refused_token_is_reported_and_the_gate_never_moves_back(grammars, work):
    matchers = [grammars.matcher(StructuredOutputs(regex="[ab]")) for _ in range(2)]
    reqs = [SimpleNamespace(grammar=m, grammar_handle=GrammarWork.handle(m), request_id=str(i), grammar_ended=False,
                            grammar_refused=False) for i, m in enumerate(matchers)]
    bitmask = torch.zeros((2, -(-grammars.vocab_size // 32)), dtype=torch.int32)
    word = torch.zeros(1, dtype=torch.int32)
    work.submit([], reqs, bitmask, word.data_ptr(), 5)
    work.finish()
    ok = allowed(bitmask[0], grammars.vocab_size)
    refused = next(t for t in range(grammars.vocab_size) if t not in set(ok) and t not in grammars.stop_tokens)
    work.submit([(reqs[0], ok[0]), (reqs[1], refused)], [], bitmask, word.data_ptr(), 3)  # an older ticket
    work.finish()
    assert not reqs[0].grammar_refused and reqs[1].grammar_refused
    assert word.item() == 5
    work.submit([], [], bitmask, word.data_ptr(), 7)  # an empty job opens its gate too
    work.finish()
    assert word.item() == 7
    word.fill_(-2)  # cyclic: 1 is ahead of 0xFFFFFFFE
    work.submit([], reqs[:1], bitmask, word.data_ptr(), 1)
    work.finish()
    assert word.item() == 1


def test_a_grammar_call_that_raises_fails_the_job_and_still_opens_its_gate(grammars, work):
    """xgrammar refuses to fill the mask of a grammar that took its stop token: the job counts the error (finish
    raises) after opening its gate, and the workers take the next job."""
    matcher = grammars.matcher(StructuredOutputs(regex="[ab]"))
    req = SimpleNamespace(grammar=matcher, grammar_handle=GrammarWork.handle(matcher), request_id="0",
                          grammar_ended=False, grammar_refused=False)
    bitmask = torch.zeros((1, -(-grammars.vocab_size // 32)), dtype=torch.int32)
    word = torch.zeros(1, dtype=torch.int32)
    work.submit([], [req], bitmask, word.data_ptr(), 1)
    work.finish()
    token = allowed(bitmask[0], grammars.vocab_size)[0]
    work.submit([(req, token)], [], bitmask, word.data_ptr(), 2)
    work.finish()
    work.submit([(req, grammars.stop_tokens[0])], [req], bitmask, word.data_ptr(), 3)  # ended, but not marked so
    with pytest.raises(RuntimeError, match="xgrammar raised"):
        work.finish()
    assert word.item() == 3 and not work.busy
    req.grammar_ended = True
    work.submit([], [req], bitmask, word.data_ptr(), 4)
    work.finish()
    assert word.item() == 4 and (bitmask[0] == -1).all()
