"""Kernels of one decode step on the GPU: torch.profiler over a few steady decode steps at batch B (dummy weights),
summed per kernel name and divided by the steps. One JSON line per kernel (count per step, GPU µs per step), then
a total line: kernels per step, GPU µs per step (summed, and the union of the kernels' intervals: where the span is
longer, the GPU waited), the steps' wall time, and the host's time per step in schedule / advance (launch, then
the wait for the step before) / update. GPU.
    python tools/profile_step.py --model tools/model_configs/qwen3-0.6b --batch 1 256 [--variant flashinfer-cublas]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict

import torch
from bench_common import run_fields, variant_config
from torch.profiler import ProfilerActivity, profile

from asyncllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--variant", default="flashinfer", help="as bench_latency.py's --variants (one)")
    a = ap.parse_args()
    llm = LLM(a.model, load_format="dummy", dtype="bfloat16", max_model_len=a.max_model_len,
              max_num_seqs=max(a.batch), **variant_config(a.variant))
    engine = llm.engine
    common = dict(model=os.path.basename(a.model.rstrip("/")), variant=a.variant, **run_fields())
    rng = random.Random(0)
    for batch in a.batch:
        params = SamplingParams(temperature=0.0, max_tokens=a.steps + 40, ignore_eos=True)
        for _ in range(batch):
            engine.add_request([rng.randrange(100, 20000) for _ in range(128)], params)
        for _ in range(10):  # prefill, then decode into steady state
            engine.step()
        torch.cuda.synchronize()
        phases = [0.0, 0.0, 0.0]  # host seconds in schedule, advance (launch + wait for the step before), update
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(a.steps):
                t0 = time.perf_counter()
                batch_ = engine.schedule()
                t1 = time.perf_counter()
                done = engine.advance(batch_)
                t2 = time.perf_counter()
                engine.update(done)
                t3 = time.perf_counter()
                phases[0] += t1 - t0
                phases[1] += t2 - t1
                phases[2] += t3 - t2
            wall = time.perf_counter() - start
            torch.cuda.synchronize()
        while engine.busy:
            engine.step()
        spans = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                       if ev.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, float("-inf")
        for lo, hi in spans:  # the union of the kernels' intervals (µs)
            if hi > end:
                busy += hi - max(lo, end)
                end = hi
        per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                entry = per_kernel[ev.name[:90]]
                entry[0] += 1
                entry[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
        for name, (count, us) in rows[: a.top]:
            print(json.dumps(dict(bench="step_kernels", batch=batch, kernel=name, per_step=round(count / a.steps, 2),
                                  gpu_us_per_step=round(us / a.steps, 1), **common)), flush=True)
        print(json.dumps(dict(bench="step_kernels_total", batch=batch,
                              kernels_per_step=round(sum(c for c, _ in per_kernel.values()) / a.steps, 1),
                              gpu_us_per_step=round(sum(u for _, u in per_kernel.values()) / a.steps, 1),
                              gpu_busy_us_per_step=round(busy / a.steps, 1),
                              gpu_span_us_per_step=round((spans[-1][1] - spans[0][0]) / a.steps, 1),
                              wall_us_per_step=round(1e6 * wall / a.steps, 1),
                              host_schedule_us=round(1e6 * phases[0] / a.steps, 1),
                              host_advance_us=round(1e6 * phases[1] / a.steps, 1),
                              host_update_us=round(1e6 * phases[2] / a.steps, 1), **common)),
              flush=True)


if __name__ == "__main__":
    main()
