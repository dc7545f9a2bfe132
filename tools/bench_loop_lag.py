"""Event-loop lag while the AsyncEngine decodes on the GPU: N concurrent streams (dummy weights), and a probe
coroutine that sleeps 1 ms and records how late it wakes. Also the streamed tokens/s. Overlap on and off in the
same run. One JSON line per variant.
    python tools/bench_loop_lag.py --model tools/model_configs/qwen3-0.6b [--streams 64] [--new-tokens 256]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import time

import torch
from bench_common import percentile, run_fields

from asyncllm import AsyncEngine, SamplingParams


async def run(model: str, overlap: bool, streams: int, new_tokens: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(128)] for _ in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    async with AsyncEngine(model, load_format="dummy", dtype="bfloat16", max_model_len=1024,
                           overlap_schedule=overlap) as engine:
        await engine.generate(prompts[0], SamplingParams(max_tokens=4))  # warm-up
        lags: list[float] = []
        done = False

        async def probe() -> None:
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        async def consume(ids: list[int]) -> int:
            n = 0
            async for chunk in engine.stream(ids, params):
                n += len(chunk.token_ids)
            return n

        probe_task = asyncio.create_task(probe())
        t = time.perf_counter()
        tokens = sum(await asyncio.gather(*(consume(p) for p in prompts)))
        secs = time.perf_counter() - t
        done = True
        await probe_task
    ms = [x * 1e3 for x in lags]
    return dict(overlap=overlap, streams=streams, new_tokens=new_tokens, streamed_tok_per_s=round(tokens / secs, 1),
                lag_p50_ms=round(percentile(ms, 0.5), 3), lag_p99_ms=round(percentile(ms, 0.99), 3),
                lag_max_ms=round(max(ms), 3), samples=len(ms))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    a = ap.parse_args()
    common = dict(bench="loop_lag", model=os.path.basename(a.model.rstrip("/")), **run_fields())
    for overlap in (True, False):
        out = asyncio.run(run(a.model, overlap, a.streams, a.new_tokens))
        print(json.dumps({**out, **common}), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
