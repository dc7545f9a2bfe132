"""Scheduler policy without a model: budgets, ordering, chunking, preemption, admission errors."""
from __future__ import annotations

import pytest

from asyncllm.engine.kv_cache import BlockManager
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.engine.scheduler import Scheduler, SchedulerConfig
from asyncllm.errors import InvalidRequestError
from asyncllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens=32, max_len=64):
    return Scheduler(SchedulerConfig(max_seqs, max_tokens, max_len), BlockManager(num_blocks, block_size))


def req(rid, prompt_len, max_tokens=8, eos=()):
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(temperature=0.0), max_tokens, frozenset(eos))


def run_step(s: Scheduler, token=7):
    batch = s.schedule()
    return batch, s.update(batch, [token] * sum(batch.sample))


def test_fcfs_and_token_budget_chunks_prefill():
    s = make(max_tokens=10)
    a, b = req("a", 6), req("b", 7)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [r.request_id for r in batch.requests] == ["a", "b"]
    assert batch.num_new_tokens == [6, 4] and batch.sample == [True, False]
    s.update(batch, [1])
    batch = s.schedule()  # a decodes, b finishes its prefill
    assert batch.num_new_tokens == [1, 3] and batch.sample == [True, True]
    assert batch.starts == [6, 4]


def test_max_num_seqs_limits_running():
    s = make(max_seqs=2)
    for i in range(4):
        s.add(req(f"r{i}", 3))
    batch = s.schedule()
    assert len(batch) == 2 and len(s.running) == 2 and len(s.waiting) == 2


def test_finish_frees_blocks_and_admits_waiting():
    s = make(max_seqs=1)
    s.add(req("a", 3, max_tokens=2))
    s.add(req("b", 3, max_tokens=2))
    _, out = run_step(s)
    assert [r.request_id for r in out] == ["a"]
    _, out = run_step(s)
    assert out[0].finished and out[0].finish_reason == "length"
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.requests] == ["b"]
    run_step(s)
    assert not s.has_unfinished and s.blocks.num_free_blocks == s.blocks.num_blocks


def test_preemption_is_lifo_and_recomputes_everything():
    s = make(num_blocks=4, block_size=4, max_len=16)
    a, b = req("a", 4, max_tokens=8), req("b", 4, max_tokens=8)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 1 block each, one output token each
    run_step(s)  # a, b each need a 2nd block: 4 blocks used
    assert s.blocks.num_free_blocks == 0
    for _ in range(4):  # positions 5..8: the 4th step needs a 3rd block for position 8
        run_step(s)
    # a needs a 3rd block: b (admitted last) is preempted
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert s.stats.num_preemptions == 1 and s.waiting[0] is b
    while s.has_unfinished:
        run_step(s)
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert s.blocks.num_free_blocks == 4


def test_admission_errors():
    s = make(num_blocks=4, block_size=4, max_len=64)
    with pytest.raises(InvalidRequestError, match="maximum context length is 64 tokens.*70 tokens"):
        s.add(req("long", 60, max_tokens=10))
    with pytest.raises(InvalidRequestError, match="whole cache holds 16 tokens"):
        s.add(req("big", 10, max_tokens=10))
    with pytest.raises(InvalidRequestError, match="empty"):
        s.add(req("empty", 0))
    s.add(req("ok", 4))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        s.add(req("ok", 4))


def test_abort_frees_blocks_and_skips_pending_token():
    s = make()
    a, b = req("a", 5), req("b", 5)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.abort("a")
    assert a.finished and a.finish_reason == "abort" and not a.block_table
    out = s.update(batch, [1, 2])
    assert out == [b] and b.output_token_ids == [2] and a.output_token_ids == []
    s.abort("b")
    s.abort("missing")
    assert s.blocks.num_free_blocks == s.blocks.num_blocks and not s.has_unfinished


def test_eos_and_stop_tokens():
    s = make()
    a = req("a", 3, eos=[7])
    b = Request("b", [1, 2, 3], SamplingParams(temperature=0.0, ignore_eos=True, stop_token_ids=[9]), 8, frozenset([7]))
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.update(batch, [7, 7])
    assert a.finish_reason == "stop" and not b.finished
    batch = s.schedule()
    s.update(batch, [9])
    assert b.finish_reason == "stop" and b.output_token_ids == [7, 9]


def test_default_step_budget_follows_the_model_size_on_gpus():
    import torch

    from asyncllm.config import EngineConfig
    from asyncllm.engine.runner import max_step_tokens

    config, cuda = EngineConfig.from_kwargs(None), torch.device("cuda")
    assert [max_step_tokens(config, cuda, int(p)) for p in (135e6, 1e9, 1.5e9, 3e9, 8e9)] == [8192, 8192, 4096, 2048, 2048]
    assert max_step_tokens(config, torch.device("cpu"), int(135e6)) == 2048
    assert max_step_tokens(EngineConfig.from_kwargs(None, max_num_seqs=4096), cuda, int(8e9)) == 4096
    assert max_step_tokens(EngineConfig.from_kwargs(None, max_num_batched_tokens=100), cuda, 1) == 100


def test_piecewise_graph_sizes_pad_at_most_a_quarter():
    """Steps with prompt tokens pad to a captured size: multiples of 16, at most 25% (or 15 tokens) more; by
    default where tokens x parameters stay under 2^41 (larger steps' GPU work hides their eager launches), and in any
    case up to 2,048 tokens (a large model's eager step costs the host more than its launches)."""
    from asyncllm.engine.piecewise_graphs import default_max_tokens, piece_sizes

    sizes = piece_sizes(8192)
    assert sizes[:9] == [16, 32, 48, 64, 80, 96, 112, 128, 160] and sizes[-1] == 8192
    assert all(s % 16 == 0 for s in sizes) and sizes == sorted(set(sizes))
    for n in range(1, 8193):
        padded = next(s for s in sizes if s >= n)
        assert padded - n < 16 or padded <= 1.25 * n
    assert piece_sizes(200)[-1] == 208 and piece_sizes(1) == [16]
    assert [default_max_tokens(8192, int(p)) for p in (135e6, 751e6, 8e9)] == [8192, 2928, 2048]
    assert default_max_tokens(1024, int(8e9)) == 1024
    assert default_max_tokens(2048, int(135e6)) == 2048 and default_max_tokens(8192, int(135e6), tp_size=2) == 0


def test_prefill_delay_gathers_new_prompts_while_others_decode():
    """With max_prefill_delay_steps = 3 and a budget of 32: a short prompt arriving while a request decodes waits
    up to 3 steps (or until the waiting prompts fill half the budget); with nothing running it starts at once."""
    s = Scheduler(SchedulerConfig(8, 32, 64, max_prefill_delay_steps=3), BlockManager(64, 4))
    s.add(req("a", 5, max_tokens=30))
    batch, _ = run_step(s)
    assert [r.request_id for r in batch.requests] == ["a"]  # nothing running: admitted at once
    s.add(req("b", 4, max_tokens=4))
    admitted_at = None
    for step in range(6):
        batch, _ = run_step(s)
        if "b" in [r.request_id for r in batch.requests]:
            admitted_at = step
            break
    assert admitted_at == 3  # held back three steps, then admitted
    s.add(req("c", 6))
    s.add(req("d", 12))  # 6 + 12 >= (32 - 2 decode rows) // 2: they fill half of what is left
    batch, _ = run_step(s)
    assert {"c", "d"} <= {r.request_id for r in batch.requests}
    s.check_invariants()


def test_only_steps_where_every_row_decodes_and_samples_replay_a_graph():
    """A CUDA graph samples every row: a step holding a one-token prompt chunk that does not sample stays eager."""
    from asyncllm.engine.cuda_graphs import graph_size, graph_sizes
    from asyncllm.engine.scheduler import Batch

    sizes = graph_sizes(32)  # 1, 2, 4, 8, 16, 32

    def batch(rows):  # (tokens, samples) per row
        b = Batch()
        for n, sample in rows:
            b.requests.append(None)
            b.starts.append(0)
            b.num_new_tokens.append(n)
            b.sample.append(sample)
            b.feed.append(-1)
        return b

    assert graph_size(sizes, batch([(1, True)] * 3)) == 4
    assert graph_size(sizes, batch([(1, True)] * 17)) == 32
    assert graph_size(sizes, batch([(1, True)] * 33)) == 0  # above the largest graph
    assert graph_size(sizes, batch([(1, True), (2, True)])) == 0  # a prompt chunk
    assert graph_size([], batch([(1, True)])) == 0  # no graphs
    s = make(max_tokens=2)  # such a step happens: one decode row leaves one token of budget for a new prompt
    s.add(req("a", 1, max_tokens=20))
    run_step(s)
    s.add(req("b", 9))
    step = s.schedule()
    assert step.num_new_tokens == [1, 1] and step.sample == [True, False]
    assert graph_size(sizes, step) == 0


def learned_costs(s: Scheduler, decode_ms: float, ms_per_prompt_token: float) -> None:
    """Feed the scheduler's StepCosts steps timed as decode_ms + ms_per_prompt_token per prompt token."""
    for p in range(10, 410, 20):
        s.costs.observe(0, 4, decode_ms)
        s.costs.observe(p, 4, decode_ms + ms_per_prompt_token * p)


def test_step_costs_learn_the_slope_and_the_fixed_cost():
    from asyncllm.engine.step_costs import MIN_SAMPLES, StepCosts

    costs = StepCosts(2.5)
    costs.observe(100, 0, 50.0)  # no decode rows: says nothing of the slowdown
    assert costs.num_samples == 0
    costs.decode_ms = 6.0  # the start-up prior (the largest decode graph's replay)
    # steps with prompt tokens cost 2 ms more than a decode step whatever their size, and 0.05 ms a token
    for i in range(MIN_SAMPLES - 1):
        costs.observe(100 + 200 * (i % 3), 64, 8.0 + 0.05 * (100 + 200 * (i % 3)))
    assert costs.limit() is None  # too few steps with prompt tokens yet
    costs.observe(700, 64, 8.0 + 0.05 * 700)
    assert costs.ms_per_prompt_token == pytest.approx(0.05) and costs.fixed_ms == pytest.approx(2.0)
    assert costs.limit() in (139, 140)  # (1.5 * 6.0 - 2.0) / 0.05, floating-point rounding
    for _ in range(20):  # steps all of one size say nothing new of the slope: it is kept
        costs.observe(180, 64, 8.0 + 0.05 * 180)
    assert costs.ms_per_prompt_token == pytest.approx(0.05, rel=0.02)
    for _ in range(400):  # decode steps measured slower than the prior (as slow as the fixed part): the limit grows
        costs.observe(0, 64, 8.0)
    assert costs.decode_ms == pytest.approx(8.0, rel=1e-3) and costs.fixed_ms < 0.01
    assert costs.limit() in range(235, 245)  # 1.5 * 8.0 / 0.05
    assert StepCosts(0, decode_ms=6.0, ms_per_prompt_token=0.05).limit() is None  # turned off
    assert StepCosts(2.5, decode_ms=1.0, ms_per_prompt_token=1.0).limit() == 16  # always some progress


def test_the_limit_does_not_collapse_under_a_fixed_cost():
    """Closed loop: each step takes min(limit, what is waiting) prompt tokens and costs decode + a fixed 12 ms
    (twice a decode step) + 0.02 ms a token, with noise. Averaging the cost per token would charge the fixed cost
    to the tokens, shrink the limit, and so on down to the minimum; the slope settles, and the fixed cost, more than
    the allowance of 1.5 decode steps, takes only half of it."""
    import random

    from asyncllm.engine.step_costs import StepCosts

    rng = random.Random(0)
    costs = StepCosts(2.5, decode_ms=6.0)
    limits = []
    for _ in range(3000):
        limit = costs.limit() or 2048
        p = min(limit, rng.randint(16, 2048))
        costs.observe(p, 32, (6.0 + 12.0 + 0.02 * p) * rng.uniform(0.95, 1.05))
        costs.observe(0, 32, 6.0 * rng.uniform(0.95, 1.05))
        limits.append(costs.limit())
    true = 0.5 * 1.5 * 6.0 / 0.02  # 225
    assert all(x is not None and 0.7 * true < x < 1.45 * true for x in limits[1000:]), (min(limits[1000:]), max(limits[1000:]))


def test_prompt_tokens_are_limited_while_requests_decode():
    s = Scheduler(SchedulerConfig(8, 512, 4096, max_step_slowdown=2.0), BlockManager(512, 16))
    learned_costs(s, decode_ms=5.0, ms_per_prompt_token=0.05)
    limit = s.costs.limit()
    assert limit in (99, 100)  # 1.0 * 5.0 / 0.05
    a = req("a", 300, max_tokens=100)
    s.add(a)
    batch, _ = run_step(s)
    assert batch.num_new_tokens == [300]  # nobody decodes: the whole budget
    b = req("b", 400, max_tokens=10)
    s.add(b)
    seen = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        batch, _ = run_step(s)
        assert batch.requests[0] is a and batch.num_new_tokens[0] == 1  # a decodes in every step
        assert batch.num_prompt_tokens <= limit and batch.num_decode_rows == 1
        seen.append(batch.num_new_tokens[1])
    assert sum(seen) == 400 and seen[:-1] == [limit] * (len(seen) - 1)
    # the limit holds however many wait for their first token: a burst does not stretch the decoders' steps
    for i in range(4):
        s.add(req(f"q{i}", 150, max_tokens=4))
    seen = []
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        batch, _ = run_step(s)
        assert batch.num_new_tokens[:2] == [1, 1] and batch.num_prompt_tokens <= limit
        seen.append(batch.num_prompt_tokens)
    assert sum(seen) == 600 and seen[:-1] == [limit] * (len(seen) - 1)


def test_a_backlog_raises_the_limit_and_drains():
    """Prompt tokens arriving faster than the limit lets through raise it to 1/QUEUE_STEPS of the backlog: the queue
    levels off at about QUEUE_STEPS steps of arrivals, and drains once they stop."""
    from asyncllm.engine.scheduler import QUEUE_STEPS

    s = Scheduler(SchedulerConfig(64, 4096, 8192, max_step_slowdown=2.0), BlockManager(8192, 16))
    learned_costs(s, decode_ms=5.0, ms_per_prompt_token=0.05)
    for i in range(32):  # decoders
        s.add(req(f"d{i}", 20, max_tokens=2000))
    run_step(s)

    def backlog() -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in [*s.waiting, *s.running] if r.num_computed_tokens < r.num_prompt_tokens)

    levels = []
    for step in range(800):  # 300 prompt tokens arrive every step, three times the limit of 100
        s.add(req(f"n{step}", 300, max_tokens=1))
        before = backlog()
        batch, _ = run_step(s)
        assert batch.num_decode_rows >= 32 and batch.num_prompt_tokens <= max(100, before // QUEUE_STEPS)
        levels.append(backlog())
    assert 0.8 * QUEUE_STEPS * 300 < max(levels[-100:]) <= 1.1 * QUEUE_STEPS * 300, max(levels[-100:])
    steps = 0
    while s.waiting or backlog():
        run_step(s)
        steps += 1
    assert steps <= 3 * QUEUE_STEPS
