"""Workload 2 of BENCHMARKS.md: decode latency (ms per step) at batch 1..256, 128-token prompts, dummy weights,
our engine in several variants in the same run (backend, CUDA graphs off with '-eager', overlap scheduling off
with '-no-overlap'; the torch backend is our previous version), with the fraction of the bandwidth floor (weights
actually streamed + the batch's KV read once per step; an untied input embedding is only gathered) and the host vs
GPU time per step. `outside_ms_per_token` is the figure to quote: `LLM.generate` timed as a whole with max_tokens
1 + N minus max_tokens 1, divided by N, best of 3 (--outside-reps 0 skips it). GPU. One JSON line per result.
    python tools/bench_latency.py --model tools/model_configs/qwen3-0.6b [--batches 1 8 32] [--variants flashinfer triton]
    torchrun --standalone --nproc-per-node 4 tools/bench_latency.py --model ... --variants flashinfer  (one variant)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time

import torch
from bench_common import StepTimer, run_fields, variant_config

from asyncllm import LLM, SamplingParams


# copy bandwidth by device name (the project's BENCHMARKS brief: measured)
COPY_TBS = {"H200": 4.3, "H100": 2.99}


def copy_bandwidth_tbs(device_name: str) -> float:
    for name, tbs in COPY_TBS.items():
        if name in device_name:
            return tbs
    raise SystemExit(f"no measured copy bandwidth for {device_name!r}: pass --bandwidth-tbs")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    ap.add_argument("--variants", nargs="+", default=["flashinfer", "flashinfer-no-overlap", "flashinfer-eager",
                                                      "triton", "torch"],
                    help="BACKEND[-eager][-no-pieces][-no-overlap][-nccl|-symm][-cublas][-no-pdl][-wide|-wide-swiglu][-rope-apart|-rope-in-decode]")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="the copy bandwidth of the floor (default: "
                    "the BENCHMARKS brief's figure for the device: H100 2.99, H200 4.3)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--outside-reps", type=int, default=3)
    a = ap.parse_args()
    if a.bandwidth_tbs is None:
        a.bandwidth_tbs = copy_bandwidth_tbs(torch.cuda.get_device_name())
    common = dict(model=os.path.basename(a.model.rstrip("/")), prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                  max_model_len=a.max_model_len, tp=int(os.environ.get("WORLD_SIZE", "1")), **run_fields())
    for variant in a.variants:
        llm = LLM(a.model, load_format="dummy", dtype="bfloat16", **variant_config(variant),
                  max_model_len=a.max_model_len, max_num_seqs=max(a.batches),
                  max_num_batched_tokens=max(a.batches) * a.prompt_len)
        if llm.is_follower:  # under torchrun: rank 0 has finished this variant
            continue
        engine = llm.engine
        timer = StepTimer(engine)
        model = engine.runner.model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if model.lm_head is not None:  # untied: the input embedding is gathered (a row per token), not streamed
            weight_bytes -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
        kv_token_bytes = engine.runner.block_bytes / engine.config.block_size
        rng = random.Random(0)
        for batch in a.batches:
            prompts = [[rng.randrange(100, 20000) for _ in range(a.prompt_len)] for _ in range(batch)]
            params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
            for ids in prompts:
                engine.add_request(ids, params)
            engine.step()  # prefill (the budget holds every prompt)
            engine.step()
            torch.cuda.synchronize()
            timer.reset()
            t, steps = time.perf_counter(), 0
            while engine.busy:
                engine.step()
                steps += 1
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            ms = wall / steps * 1e3
            step_times = timer.summary(wall)  # before outside_ms runs more steps through the same timer
            ctx = a.prompt_len + a.new_tokens / 2  # mean context over the decode
            floor_ms = (weight_bytes + batch * ctx * kv_token_bytes) / (a.bandwidth_tbs * 1e12) * 1e3
            outside = outside_ms(llm, rng, batch, a.prompt_len, a.new_tokens, a.outside_reps)
            quoted = outside if outside is not None else ms
            print(json.dumps(dict(bench="decode_latency", variant=variant, batch=batch, ms_per_step=round(ms, 3),
                                  outside_ms_per_token=outside and round(outside, 3),
                                  output_tok_per_s=round(batch / quoted * 1e3, 1), floor_ms=round(floor_ms, 3),
                                  floor_fraction=round(floor_ms / quoted, 3), bandwidth_tbs=a.bandwidth_tbs,
                                  **step_times, **common)),
                  flush=True)
        llm.shutdown()  # tensor parallelism: release the followers
        del llm, engine, timer
        gc.collect()  # the timer's wrappers form a reference cycle with the runner
        torch.cuda.empty_cache()


def outside_ms(llm: LLM, rng: random.Random, batch: int, prompt_len: int, new_tokens: int, reps: int) -> float | None:
    """ms per decode step from outside the engine: generate(1 + N) - generate(1), over N, best of `reps`; new
    random prompts each time (a repeated prompt would hit the prefix cache, and its repeated output too)."""
    if reps <= 0:
        return None

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        best = float("inf")
        for _ in range(reps):
            prompts = [[rng.randrange(100, 20000) for _ in range(prompt_len)] for _ in range(batch)]
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t)
        return best

    return (timed(1 + new_tokens) - timed(1)) / new_tokens * 1e3


if __name__ == "__main__":
    main()
