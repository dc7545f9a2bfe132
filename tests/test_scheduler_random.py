"""The scheduler under random workloads, with a model-free stand-in for the GPU, invariants checked every step.

The stand-in keeps a fake KV cache (slot -> token id) written and read through its own copy of the block tables,
kept up to date only by the updates the runner's device tables get (step_inputs.table_updates: rows reused,
preemption, blocks swapped by the prefix cache), and picks each next token as a hash of the tokens it *reads back* for the whole sequence: a block
handed out with the wrong contents changes the output. Every finished request must match the reference (the same
hash over its true tokens), with the prefix cache on or off, overlap on or off, under preemption, bursts, aborts
and stop-string finishes from above.
"""
from __future__ import annotations

import os
import random

import pytest

from asyncllm.engine.kv_cache import BlockManager
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch, Scheduler, SchedulerConfig
from asyncllm.engine.step_inputs import table_updates
from asyncllm.sampling_params import SamplingParams

VOCAB, EOS = 40, 0


def next_token(tokens: list[int]) -> int:
    return hash(tuple(tokens)) % VOCAB


class FakeRunner:
    """Runs a step at launch (steps run in launch order, as on one CUDA stream)."""

    def __init__(self, num_blocks: int, block_size: int, num_rows: int) -> None:
        self.kv = [-1] * (num_blocks * block_size)
        self.bs = block_size
        self.last_sampled: list[int] = []
        self.tables = [[-1] * num_blocks for _ in range(num_rows)]  # the "device" tables, stale where not updated

    def slot(self, row: int, pos: int) -> int:
        block = self.tables[row][pos // self.bs]
        assert block >= 0, "a block the device tables were never sent"
        return block * self.bs + pos % self.bs

    def launch(self, batch: Batch) -> tuple[Batch, list[int]]:
        flat, _ = table_updates(batch.requests)
        for row, col, block in zip(flat[0::3], flat[1::3], flat[2::3]):
            self.tables[row][col] = block
        sampled = []
        for req, start, n, sample, feed in zip(batch.requests, batch.starts, batch.num_new_tokens, batch.sample,
                                               batch.feed):
            ids = req.token_ids[start : start + n]
            if feed >= 0:  # the last input token is still "on the device"
                ids = ids[: n - 1] + [self.last_sampled[feed]]
            assert len(ids) == n
            for p, t in zip(range(start, start + n), ids):
                self.kv[self.slot(req.row, p)] = t
            if sample:
                seen = [self.kv[self.slot(req.row, p)] for p in range(start + n)]
                sampled.append(next_token(seen))
        self.last_sampled = sampled
        return batch, sampled


def reference(prompt: list[int], max_tokens: int, ignore_eos: bool) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if t == EOS and not ignore_eos:
            break
    return out


def run_workload(seed: int, prefix_caching: bool, overlap: bool) -> tuple[list[Request], set[str], int, int]:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    max_len = 96
    num_blocks = rng.randint(max_len // bs, 3 * max_len // bs)  # tight: preemption and eviction happen
    config = SchedulerConfig(max_num_seqs=rng.randint(2, 12), max_num_batched_tokens=rng.choice([8, 16, 64, 256]),
                             max_model_len=max_len, max_prefill_delay_steps=rng.choice([0, 0, 2, 5]),
                             max_step_slowdown=rng.choice([0, 1.5, 3.0]))
    blocks = BlockManager(num_blocks, bs, prefix_caching)
    sched = Scheduler(config, blocks)
    runner = FakeRunner(num_blocks, bs, config.max_num_seqs)
    systems = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 40))] for _ in range(3)]
    pending_arrivals = []
    for i in range(rng.randint(10, 30)):
        prompt = rng.choice(systems + [[]]) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
        prompt = prompt[: max_len - 2]
        # max_tokens 0 now and then: the prompt only (its sampled token dropped)
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(rng.random() < 0.9, max_len - len(prompt)),
                                ignore_eos=rng.random() < 0.5, logprobs=0 if rng.random() < 0.3 else None)
        when = 0 if rng.random() < 0.4 else rng.randint(0, 60)  # a burst at step 0, the rest staggered
        pending_arrivals.append((when, Request(f"r{i}", prompt, params, params.max_tokens, frozenset({EOS}))))
    all_reqs = [r for _, r in pending_arrivals]
    cut = set()  # requests ended from above (aborted, or a stop string)
    inflight = None
    step = limited = 0
    while pending_arrivals or sched.has_unfinished or inflight is not None:
        for item in [a for a in pending_arrivals if a[0] <= step]:
            pending_arrivals.remove(item)
            sched.add(item[1])
        if sched.requests and rng.random() < 0.05:  # a client goes away
            cut.add(sched.abort(rng.choice(list(sched.requests))).request_id)
        if sched.running and rng.random() < 0.03:  # a stop string matched above the scheduler
            victim = rng.choice(sched.running)
            sched.finish(victim, "stop")
            cut.add(victim.request_id)
        decoding = any(r.num_computed_tokens >= r.num_prompt_tokens and r.num_scheduled_tokens - r.num_computed_tokens <= 1
                       for r in sched.running)
        limit = sched.costs.limit()
        batch = sched.schedule()
        sched.check_invariants()
        assert batch.extras == [i for i, r in enumerate(batch.requests) if r.extras]  # (logprobs: extras)
        assert batch.num_prompt_tokens <= batch.prompt_budget <= config.max_num_batched_tokens
        assert sum(batch.num_new_tokens) <= config.max_num_batched_tokens
        if batch.prompt_budget < config.max_num_batched_tokens:  # limited only while a request decodes
            assert decoding and limit is not None and batch.prompt_budget >= limit
            limited += 1
        # a stand-in GPU time: 1 ms a step and 0.3 ms a prompt token, noisy (what the prompt-token limit learns from)
        batch.gpu_ms = rng.uniform(0.8, 1.2) * (1.0 + 0.3 * batch.num_prompt_tokens)
        handle = runner.launch(batch) if len(batch) else None
        if overlap:
            handle, inflight = inflight, handle
        if handle is not None:
            sched.update(*handle)
        sched.check_invariants()
        step += 1
        assert step < 5000, "the workload does not finish"
    blocks.check_invariants()
    assert blocks.num_free_blocks == num_blocks
    assert all(r.finished and not r.block_table for r in all_reqs)
    return all_reqs, cut, sched.stats.num_preemptions, limited


SEEDS = range(int(os.environ.get("ASYNCLLM_RANDOM_SEEDS", 40)))  # more: ASYNCLLM_RANDOM_SEEDS=400


@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload_matches_reference(seed):
    for cache in (True, False):
        for overlap in (True, False):
            reqs, cut, _, _ = run_workload(seed, cache, overlap)
            for r in reqs:
                ref = reference(r.prompt_token_ids, r.max_tokens, r.params.ignore_eos)
                out = r.output_token_ids
                if r.request_id in cut:
                    assert out == ref[: len(out)], (cache, overlap, r.request_id)  # cut short from above
                    continue
                assert out == ref, (cache, overlap, r.request_id, r.finish_reason)
                ended_by_eos = bool(ref) and ref[-1] == EOS and not r.params.ignore_eos
                assert r.finish_reason == ("stop" if ended_by_eos else "length")


def test_random_workloads_exercise_preemption_and_cache_hits():
    """The workloads above are not too easy: some preempt, the cache is hit, and prompt tokens are limited while
    others decode."""
    preemptions = hits = limited = 0
    for seed in range(40):
        reqs, _, n, steps = run_workload(seed, True, True)
        preemptions += n
        limited += steps
        hits += sum(r.num_cached_tokens > 0 for r in reqs)
    assert preemptions > 10 and hits > 40 and limited > 40
