"""Host work per token that could grow with a request's length, measured at several output lengths (CPU, no model).
One JSON line per (part, length): microseconds per token averaged over an output of that length (flat = linear),
best of 3.

- detokenizer: IncrementalDetokenizer.push + take(final=False) per token (one stop string), the server's path;
- prefix_offers: BlockManager.cache_blocks as the scheduler calls it each time a request fills a block;
- prefix_offers_repeated: the same for a request repeating one the cache holds whole (its seeded output too): each
  block is offered in the step that fills it (refused: still being written) and again in the next (adopted);
- penalties: logit_adjust.step_penalties' (before: ModelRunner._penalties') host work per step for --rows penalized requests of that many output tokens
  (after the first step), in ms per step, --vocab columns;
- evictions: allocating KV blocks when a full prefix cache must give them up (µs per block, and the slowest
  allocation in ms: a pause of the loop; 10k / 100k / 300k blocks, 300k being SmolLM2's cache on an H200);
- decode_step: the host work of a pure-decode step of --rows running requests (scheduling, packing the step's
  inputs, appending the sampled tokens), µs per step: the per-row part the serving loop shares with LLM.generate;
- generate_stand_in: the same seen from outside, `LLM.generate` of --rows requests with the serving benchmark's
  stand-in runner (no model; the CPU's eager step inputs), timed as a whole: µs per output token.

Run it against another checkout with PYTHONPATH=that/checkout (its API is detected) to compare commits.
    python tools/bench_host_costs.py [--lengths 1024 8192 32768] [--rows 256] [--vocab 151936]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import run_fields  # noqa: E402


def detokenizer(tok, ids: list[int]) -> float:  # noqa: ANN001
    from asyncllm.engine.detokenizer import IncrementalDetokenizer
    from asyncllm.sampling_params import SamplingParams

    d = IncrementalDetokenizer(tok, [1, 2, 3], SamplingParams(stop=["<never>"], max_tokens=len(ids)))
    t = time.perf_counter()
    for i in ids:
        d.push(i)
        d.take(False)
    return (time.perf_counter() - t) / len(ids) * 1e6


def prefix_offers(n: int, rng: random.Random) -> float:
    from asyncllm.engine.kv_cache import BlockManager

    bs = 16
    bm = BlockManager(n // bs + 8, bs, True)
    with_count = "num_blocks" in inspect.signature(bm.cache_blocks).parameters  # else: a slice, as before
    tokens = [rng.randrange(50000) for _ in range(bs)]
    table = bm.allocate(1)
    bm.cache_blocks(tokens, table)
    t = time.perf_counter()
    for k in range(2, n // bs + 1):
        tokens += [rng.randrange(50000) for _ in range(bs)]
        table += bm.allocate(1)
        ok = bm.cache_blocks(tokens, table, k, k - 1, k) if with_count else bm.cache_blocks(tokens[: k * bs], table, k, k - 1)
        assert ok
    return (time.perf_counter() - t) / (n - bs) * 1e6


def prefix_offers_repeated(n: int, rng: random.Random) -> float:
    from asyncllm.engine.kv_cache import BlockManager

    bs = 16
    bm = BlockManager(2 * (n // bs) + 8, bs, True)
    tokens = [rng.randrange(50000) for _ in range(n // bs * bs)]
    assert bm.cache_blocks(tokens, bm.allocate(n // bs))  # the first request, cached whole (its table kept)
    table = bm.match(tokens[:bs]) + bm.allocate(1)
    cached = 1
    t = time.perf_counter()
    for k in range(2, n // bs + 1):
        if k > 2:
            table += bm.allocate(1)
        bm.cache_blocks(tokens, table, k - 1, cached, k)  # the step that writes block k - 1: refused
        assert bm.cache_blocks(tokens, table, k, cached, k)  # the next step
        cached = k
    return (time.perf_counter() - t) / (n - bs) * 1e6


def penalties(rows: int, vocab: int, prompt: int, output: int) -> float:
    import torch

    from asyncllm.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(repetition_penalty=1.05, frequency_penalty=0.1)
    reqs = []
    for row in range(rows):
        r = types.SimpleNamespace(row=row, num_prompt_tokens=prompt, params=params,
                                  token_ids=rng.integers(0, vocab, prompt + output).tolist())
        r.output_token_ids, r.num_output_tokens = r.token_ids[prompt:], output
        reqs.append(r)
    batch = types.SimpleNamespace(requests=reqs, sample=[True] * rows, feed=[-1] * rows)
    cpu = torch.device("cpu")
    runner = types.SimpleNamespace(device=cpu, model=types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=vocab)),
                                   sampled=torch.zeros(rows, dtype=torch.int64))
    try:
        from asyncllm.layers.sampler import PenaltyCounts

        runner.penalty_counts = PenaltyCounts(rows + 1, vocab, cpu)
    except ImportError:  # counts built on the host each step
        pass
    try:
        from asyncllm.engine.logit_adjust import step_penalties

        def step(index: np.ndarray) -> None:
            step_penalties(batch, list(range(rows)), index, getattr(runner, "penalty_counts", None), cpu)
    except ImportError:  # a checkout before logit_adjust: the runner's method
        from asyncllm.engine.runner import ModelRunner

        def step(index: np.ndarray) -> None:
            ModelRunner._penalties(runner, batch, list(range(rows)), index)
    index = np.arange(rows)
    step(index)  # the first step
    t = time.perf_counter()
    for _ in range(5):
        step(index)
    return (time.perf_counter() - t) / 5 * 1e3


def evictions(num_blocks: int, rng: random.Random) -> tuple[float, float]:
    """A prefix cache that fills the whole KV cache (finished requests of 20 blocks each, as a long-running server
    leaves it): µs per block allocated when every block must be evicted first (16 blocks per call, as a decode
    step of 256 requests needs), mean over at least 200 calls and 4 x num_blocks / 64 blocks (before 2026-12-05 a
    pass walking the whole tree freed num_blocks / 64 blocks at once: fewer calls would time a varying share of
    one pass), and the slowest call in ms."""
    from asyncllm.engine.kv_cache import BlockManager

    bs = 16
    bm = BlockManager(num_blocks, bs, True)
    while bm.num_free_blocks >= 20 and bm.can_allocate(20) and len(bm.cache.block_node) + 20 <= num_blocks:
        table = bm.allocate(20)
        bm.cache_blocks([rng.randrange(50000) for _ in range(20 * bs)], table)
        bm.free(table)
    calls = max(200, 4 * (num_blocks // 64) // 16 + 1)
    slowest = 0.0
    t = start = time.perf_counter()
    for _ in range(calls):
        bm.allocate(16)  # held: the next call must evict again
        now = time.perf_counter()
        slowest, t = max(slowest, now - t), now
    return (t - start) / (calls * 16) * 1e6, slowest * 1e3


def decode_steps(rows: int, steps: int = 300) -> dict[str, float]:
    """Host work of one pure-decode step of `rows` running requests (prefix cache on, overlap's pending tokens):
    Scheduler.schedule, step_inputs.pack (a CUDA-graph step) and Scheduler.update, µs per step, mean over `steps`
    steps after the prompts' prefill."""
    from asyncllm.engine.kv_cache import BlockManager
    from asyncllm.engine.request import Request
    from asyncllm.engine.scheduler import Scheduler, SchedulerConfig
    from asyncllm.engine.step_inputs import pack
    from asyncllm.sampling_params import SamplingParams

    rng = random.Random(0)
    sched = Scheduler(SchedulerConfig(rows, 8192, 8192), BlockManager(rows * 200, 16, True))
    for i in range(rows):
        prompt = [rng.randrange(50000) for _ in range(rng.randint(100, 1000))]
        sched.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=4000, ignore_eos=True), 4000, frozenset({2})))
    spent = dict.fromkeys(("schedule", "pack", "update"), 0.0)
    prev, seen = None, 0
    for _ in range(steps + 1000):  # the prompts' prefill first (their steps are not counted)
        if seen == steps:
            break
        t0 = time.perf_counter()
        batch = sched.schedule()
        decode = len(batch.requests) == rows and all(n == 1 for n in batch.num_new_tokens)
        t1 = time.perf_counter()
        pack(batch, rows if decode else 0, rows, rng, ())
        t2 = time.perf_counter()
        if prev is not None:  # the previous step's tokens arrive while this one is in flight (overlap)
            sched.update(prev, [rng.randrange(50000) for _ in range(sum(prev.sample))])
        t3 = time.perf_counter()
        prev = batch
        if decode:
            seen += 1
            for k, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
                spent[k] += dt
    return {k: round(v / steps * 1e6, 1) for k, v in spent.items()}


def generate_stand_in(rows: int, output_len: int = 256) -> dict[str, float]:
    """The same host work seen from outside: `LLM.generate` of `rows` requests (prompts of 100-1000 random ids,
    `output_len` tokens each, ignore_eos) with the serving benchmark's stand-in runner (step inputs built, no
    model), timed as a whole after a warm-up: µs per output token. The default model's config cut to one layer
    (dummy weights, CPU), with a KV cache for every request at once (no preemption)."""
    import shutil
    import tempfile

    from bench_serving import install_stand_in
    from transformers import AutoConfig

    from asyncllm import LLM, SamplingParams
    from asyncllm.model_files import default_model_dir

    src = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        config = AutoConfig.from_pretrained(src)
        config.num_hidden_layers = 1
        config.save_pretrained(tmp)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, tmp)
        install_stand_in()
        llm = LLM(tmp, load_format="dummy", device="cpu", max_num_seqs=rows, max_model_len=2048,
                  num_kv_blocks=rows * -(-(1000 + output_len) // 16) + 64)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    llm.generate([[rng.randrange(100, 40000) for _ in range(200)]] * 2, params, use_tqdm=False)  # warm-up
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(100, 1000))] for _ in range(rows)]
    stats = llm.engine.stats
    tokens, preemptions = stats.generation_tokens, stats.num_preemptions
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    tokens = stats.generation_tokens - tokens
    assert stats.num_preemptions == preemptions, "the KV cache was meant to hold every request"
    return {"us_per_token": round(wall / tokens * 1e6, 2), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--evictions", type=int, nargs="+", default=[10_000, 100_000, 300_000], metavar="BLOCKS",
                    help="cache sizes of the evictions part")
    ap.add_argument("--parts", nargs="+", help="only these parts (default: all)")
    a = ap.parse_args()
    want = lambda part: not a.parts or part in a.parts  # noqa: E731
    from transformers import AutoTokenizer

    from asyncllm.model_files import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    common = run_fields()
    rng = random.Random(0)
    by_length = {"detokenizer": lambda n, ids: min(detokenizer(tok, ids) for _ in range(3)),
                 "prefix_offers": lambda n, ids: min(prefix_offers(n, rng) for _ in range(3)),
                 "prefix_offers_repeated": lambda n, ids: min(prefix_offers_repeated(n, rng) for _ in range(3))}
    for n in a.lengths:
        ids = [rng.randrange(100, 40000) for _ in range(n)]
        for part, measure in by_length.items():
            if want(part):
                print(json.dumps({"bench": "host_costs", "part": part, "output_len": n,
                                  "us_per_token": round(measure(n, ids), 3), **common}), flush=True)
    for n in a.evictions if want("evictions") else ():
        per_block, slowest = evictions(n, rng)
        print(json.dumps({"bench": "host_costs", "part": "evictions", "num_blocks": n,
                          "us_per_block": round(per_block, 2), "slowest_call_ms": round(slowest, 2), **common}),
              flush=True)
    if want("decode_step"):
        print(json.dumps({"bench": "host_costs", "part": "decode_step", "rows": a.rows,
                          "us_per_step": decode_steps(a.rows), **common}), flush=True)
    if want("generate_stand_in"):
        print(json.dumps({"bench": "host_costs", "part": "generate_stand_in", "rows": a.rows,
                          **generate_stand_in(a.rows), **common}), flush=True)
    for n in (256, 4096) if want("penalties") else ():
        print(json.dumps({"bench": "host_costs", "part": "penalties", "rows": a.rows, "vocab": a.vocab, "prompt_len": 550,
                          "output_len": n, "ms_per_step": round(penalties(a.rows, a.vocab, 550, n), 3), **common}),
              flush=True)


if __name__ == "__main__":
    main()
