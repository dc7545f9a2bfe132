"""Where a tensor-parallel decode step's time goes (GPU): torch.profiler on every rank over --steps decode steps of
--batch requests (dummy weights, CUDA graphs as served). Prints one JSON line per rank: GPU ms per step, ms in
collective kernels (NCCL, symmetric-memory all-reduce) per step and their share (a collective's time includes waiting
for the slowest rank), the host time per step spent blocked (stream/event synchronize), and the GPU's idle time
within the steps' span (gaps between kernels, also inside graphs). --trace-dir writes a chrome trace and the top host / device ops per rank.
    torchrun --standalone --nproc-per-node 4 tools/profile_tp.py --model tools/model_configs/llama-3.1-8b
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch
from bench_common import run_fields, variant_config
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from asyncllm import SamplingParams
from asyncllm.config import EngineConfig
from asyncllm.engine.core import EngineCore

# collectives: NCCL's kernels and the symmetric-memory all-reduce
COMM_KERNELS = ("nccl", "all_reduce")
# host calls that wait for the GPU
BLOCKING = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def summarize(prof, steps: int) -> dict:
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    comm = [e for e in kernels if any(k in e.name.lower() for k in COMM_KERNELS)]
    blocked = [e for e in events if e.device_type == DeviceType.CPU and any(b in e.name for b in BLOCKING)]

    def ms(evs):
        return sum(e.time_range.elapsed_us() for e in evs) / 1e3 / steps

    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 1e3 if kernels else 0
    busy, end = 0.0, float("-inf")  # union of kernel intervals (us): the rest of the span the GPU sat idle
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        start, stop = max(e.time_range.start, end), e.time_range.end
        busy, end = busy + max(0.0, stop - start), max(end, stop)
    return dict(gpu_span_ms_per_step=round(span / steps, 3), gpu_idle_ms_per_step=round((span - busy / 1e3) / steps, 3),
                kernels_per_step=round(len(kernels) / steps, 1), kernel_ms_per_step=round(ms(kernels), 3),
                comm_ms_per_step=round(ms(comm), 3), comm_kernels_per_step=round(len(comm) / steps, 1),
                comm_share=round(ms(comm) / max(ms(kernels), 1e-9), 3), host_blocked_ms_per_step=round(ms(blocked), 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--variant", default="flashinfer", help="BACKEND[-eager][-no-pieces][-no-overlap][-nccl|-symm][-cublas][-no-pdl][-wide|-wide-swiglu][-rope-apart|-rope-in-decode]")
    ap.add_argument("--trace-dir")
    ap.add_argument("--device", default="cuda", help="cpu: only to try this tool (gloo, float32)")
    a = ap.parse_args()
    core = EngineCore(EngineConfig.from_kwargs(
        a.model, load_format="dummy", device=a.device, dtype="bfloat16" if a.device == "cuda" else "float32", max_model_len=a.prompt_len + a.steps + 32,
        max_num_seqs=a.batch, max_num_batched_tokens=max(2048, a.batch * a.prompt_len), **variant_config(a.variant)))
    rank = core.runner.tp.rank
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    if core.is_follower:  # profile every step rank 0 sends (its warm-up steps included: 2 per 64)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            core.follow()
        steps = a.steps + 4
    else:
        rng = random.Random(0)
        params = SamplingParams(temperature=0.0, max_tokens=a.steps + 4, ignore_eos=True)
        for _ in range(a.batch):
            core.add_request([rng.randrange(core.hf_config.vocab_size) for _ in range(a.prompt_len)], params)
        for _ in range(4):  # prefill and the first decode steps (graphs, plans warm)
            core.step()
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            steps = 0
            while core.busy:
                core.step()
                steps += 1
            sync()
    fields = dict(bench="tp_profile", rank=rank, tp=core.runner.tp.size, batch=a.batch, steps=steps, variant=a.variant,
                  model=os.path.basename(a.model.rstrip("/")), **summarize(prof, steps), **run_fields())
    print(json.dumps(fields), flush=True)
    core.shutdown()  # rank 0: release the followers
    if a.trace_dir:
        os.makedirs(a.trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(a.trace_dir, f"rank{rank}.json"))
        with open(os.path.join(a.trace_dir, f"rank{rank}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
            f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))


if __name__ == "__main__":
    main()
