"""Where the host's time goes in decode steps: cProfile around `LLM.generate` of --batch requests (dummy weights,
prompts of --prompt-len random ids, --steps tokens each, ignore_eos), after a warm-up. One JSON line per function
among the --top by own time: calls, own and cumulative µs per decode step (the profiler's overhead included, so
compare functions, not totals with unprofiled runs), then a total line with the run's wall time per step unprofiled.
GPU or CPU (the CPU's eager path differs from the GPU's graph steps).
    python tools/profile_host.py --model DIR --batch 256 [--steps 200] [--top 30]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import time

from bench_common import run_fields

from asyncllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the bundled SmolLM2)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    llm = LLM(a.model, load_format="dummy", device=a.device, max_num_seqs=a.batch, max_model_len=2048)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True)

    def run(prof: cProfile.Profile | None = None) -> float:
        prompts = [[rng.randrange(100, 30000) for _ in range(a.prompt_len)] for _ in range(a.batch)]
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        llm.generate(prompts, params, use_tqdm=False)
        if prof is not None:
            prof.disable()
        return time.perf_counter() - t

    run()  # warm-up (graphs, kernels, allocator)
    wall = run()
    prof = cProfile.Profile()
    run(prof)
    common = dict(model=os.path.basename((a.model or "smollm2").rstrip("/")), batch=a.batch, **run_fields())
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[: a.top]
    for (path, line, name), (_, calls, own, cum, _) in top:
        print(json.dumps({"bench": "profile_host", "function": f"{os.path.basename(path)}:{line}({name})",
                          "calls_per_step": round(calls / a.steps, 2), "own_us_per_step": round(own / a.steps * 1e6, 1),
                          "cum_us_per_step": round(cum / a.steps * 1e6, 1), **common}), flush=True)
    print(json.dumps({"bench": "profile_host_total", "steps": a.steps, "wall_ms_per_step": round(wall / a.steps * 1e3, 3),
                      **common}), flush=True)


if __name__ == "__main__":
    main()
