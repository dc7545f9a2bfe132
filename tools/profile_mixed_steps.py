"""Host cost of steps that mix decode rows with new prompts (the steady state of serving many streams): `LLM`'s
engine keeps `--rows` requests decoding, and each step one or more of them is ended and replaced by a new prompt of
100-1,000 tokens. One JSON line per case (new prompts per step): wall ms per step and the launch's host ms (p50,
mean); `--profile` adds a cProfile of the steps with the first case's new prompts. GPU (dummy weights).
    python tools/profile_mixed_steps.py --model DIR [--new 0 3 12] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import time

import torch
from bench_common import run_fields

from asyncllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, default=240)
    ap.add_argument("--new", type=int, nargs="+", default=[0, 3, 12], help="new prompts per step, per case")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    llm = LLM(a.model, load_format="dummy", max_num_seqs=256)
    core, runner = llm.engine, llm.engine.runner
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    prompts = [[rng.randrange(10, 10000) for _ in range(rng.randint(100, 1000))] for _ in range(64)]
    live = [core.add_request(prompts[i % 64], params) for i in range(a.rows)]
    for _ in range(80):  # prefill, then decode for a while
        core.step()
    launch_ms: list[float] = []
    launch = runner.launch

    def timed_launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return launch(*args, **kwargs)
        finally:
            launch_ms.append((time.perf_counter() - t) * 1e3)

    runner.launch = timed_launch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    common = dict(model=os.path.basename(a.model.rstrip("/")), rows=a.rows, **run_fields())

    def run(new: int, prof: cProfile.Profile | None = None) -> None:
        launch_ms.clear()
        sync()
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(a.steps):
            for _ in range(new):
                core.abort(live.pop(0).request_id)
                live.append(core.add_request(prompts[rng.randrange(64)], params))
            core.step()
        if prof is not None:
            prof.disable()
        sync()
        ms = sorted(launch_ms)
        print(json.dumps({"bench": "mixed_steps", "new_per_step": new, "steps": a.steps,
                          "ms_per_step": round((time.perf_counter() - t) / a.steps * 1e3, 3),
                          "launch_ms_p50": round(ms[len(ms) // 2], 3), "launch_ms_mean": round(sum(ms) / len(ms), 3),
                          "profiled": prof is not None, **common}), flush=True)

    for new in a.new:
        run(new)
    if a.profile:
        prof = cProfile.Profile()
        run(next((n for n in a.new if n), 3), prof)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
        print(out.getvalue())


if __name__ == "__main__":
    main()
