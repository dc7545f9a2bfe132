"""Where ModelRunner.launch's host time goes in pure-decode steps (GPU: graph steps), perf_counter around its parts.
    python tools/profile_launch.py --model DIR --batch 256 --steps 200   (dummy weights; GPU or CPU)
One JSON line per part: calls per decode step and µs per decode step (inclusive; parts nest: launch > _forward >
graphs.forward > replay ...), then the wall time per step of the timed run (the wrappers' cost included)."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_fields  # noqa: E402

from asyncllm import LLM, SamplingParams  # noqa: E402
from asyncllm.engine import cuda_graphs, runner, step_inputs  # noqa: E402
from asyncllm.layers import sampler  # noqa: E402

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)
state = {"decode": False}


def wrap(owner, name: str, label: str, top: bool = False) -> None:
    orig = getattr(owner, name)

    def call(*args, **kwargs):
        if top:
            batch = args[1]
            state["decode"] = batch.num_prompt_tokens == 0
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            if state["decode"]:
                spent[label] += time.perf_counter() - t
                calls[label] += 1

    setattr(owner, name, call)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    llm = LLM(a.model, load_format="dummy", max_num_seqs=a.batch, max_model_len=2048)
    wrap(runner.ModelRunner, "launch", "launch", top=True)
    wrap(runner.ModelRunner, "_extras", "launch._extras")
    wrap(runner, "graph_size", "launch.graph_size")
    wrap(runner, "pack", "launch.pack")
    wrap(runner.ModelRunner, "_forward", "launch._forward")
    wrap(runner, "unpack", "launch._forward.unpack")
    wrap(step_inputs.RowTables, "apply", "launch._forward.unpack.tables_apply")
    wrap(step_inputs.HostRing, "take", "HostRing.take")
    wrap(sampler.Sampler, "set_rows", "launch._forward.set_rows")
    wrap(cuda_graphs.CudaGraphs, "forward", "launch._forward.graphs_forward")
    wrap(cuda_graphs.CudaGraphs, "sample", "launch._finish._sample.graphs_sample")
    wrap(torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay")
    wrap(runner.ModelRunner, "_finish", "launch._finish")
    wrap(runner.ModelRunner, "_sample", "launch._finish._sample")
    wrap(runner.ModelRunner, "_event", "ModelRunner._event")
    wrap(runner.ModelRunner, "_on_stream", "ModelRunner._on_stream (entry only)")
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True)

    def run() -> tuple[float, int]:
        prompts = [[rng.randrange(100, 30000) for _ in range(128)] for _ in range(a.batch)]
        steps_before = calls["launch"]
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, calls["launch"] - steps_before

    run()  # warm-up
    spent.clear()
    calls.clear()
    wall, steps = run()
    common = dict(batch=a.batch, **run_fields())
    for label in sorted(spent):
        print(json.dumps({"bench": "launch_split", "part": label, "calls_per_step": round(calls[label] / steps, 2),
                          "us_per_step": round(spent[label] / steps * 1e6, 1), **common}))
    print(json.dumps({"bench": "launch_split_total", "decode_steps": steps,
                      "wall_ms_per_step": round(wall / a.steps * 1e3, 3), **common}))


if __name__ == "__main__":
    main()
