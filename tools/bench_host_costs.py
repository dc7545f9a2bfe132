"""Host work per token that could grow with a request's length, measured at several output lengths (CPU, no model).
One JSON line per (part, length): microseconds per token averaged over an output of that length (flat = linear),
best of 3.

- detokenizer: IncrementalDetokenizer.push + take(final=False) per token (one stop string), the server's path;
- prefix_offers: BlockManager.cache_blocks as the scheduler calls it each time a request fills a block;
- penalties: ModelRunner._penalties' host work per step for --rows penalized requests of that many output tokens
  (after the first step), in ms per step, --vocab columns.

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


def penalties(rows: int, vocab: int, prompt: int, output: int) -> float:
    import torch

    from asyncllm.engine.runner import ModelRunner
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
    index = np.arange(rows)
    ModelRunner._penalties(runner, batch, list(range(rows)), index)  # the first step
    t = time.perf_counter()
    for _ in range(5):
        ModelRunner._penalties(runner, batch, list(range(rows)), index)
    return (time.perf_counter() - t) / 5 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from asyncllm.model_files import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    common = run_fields()
    rng = random.Random(0)
    for n in a.lengths:
        ids = [rng.randrange(100, 40000) for _ in range(n)]
        print(json.dumps({"bench": "host_costs", "part": "detokenizer", "output_len": n,
                          "us_per_token": round(min(detokenizer(tok, ids) for _ in range(3)), 3), **common}), flush=True)
        print(json.dumps({"bench": "host_costs", "part": "prefix_offers", "output_len": n,
                          "us_per_token": round(min(prefix_offers(n, rng) for _ in range(3)), 3), **common}), flush=True)
    for n in (256, 4096):
        print(json.dumps({"bench": "host_costs", "part": "penalties", "rows": a.rows, "vocab": a.vocab, "prompt_len": 550,
                          "output_len": n, "ms_per_step": round(penalties(a.rows, a.vocab, 550, n), 3), **common}),
              flush=True)


if __name__ == "__main__":
    main()
