"""The serving host path in one process, without sockets or a model: AsyncEngine with the stand-in runner (step
inputs built, sampled ids invented), N streams opened with `AsyncEngine.open`, each notification taking its
chunk and building the SSE frame the server would send. CPU seconds per streamed token isolate the loop's own
per-token and per-step work (delivery, detokenization, scheduling, step preparation) from sockets and clients.
One JSON line per stream count; `--profile` adds a cProfile table (stderr) of the last one.
    python tools/bench_host_path.py --streams 64 256
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import random
import sys
import time

from bench_common import run_fields
from bench_serving import install_stand_in


async def run(streams: int, output_len: int, profile: bool) -> dict:
    from asyncllm import AsyncEngine, SamplingParams
    from asyncllm.server.choices import sse_event

    engine = AsyncEngine(None, max_model_len=2048, max_num_seqs=streams, num_kv_blocks=12000)
    await engine.start()
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 10000) for _ in range(rng.randint(100, 400))] for _ in range(streams)]
    head = {"id": "cmpl-x", "created": 1, "model": "m", "object": "text_completion"}
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    left, done, frames = [streams], asyncio.Event(), [0]

    def notify(stream) -> None:  # noqa: ANN001
        chunk = stream.take()
        if chunk.text or chunk.finish_reason:
            sse_event({**head, "choices": [{"index": 0, "text": chunk.text, "logprobs": None,
                                            "finish_reason": chunk.finish_reason}]})
            frames[0] += 1
        if chunk.finish_reason:
            left[0] -= 1
            if not left[0]:
                done.set()

    warm = engine.open(prompts[0][:10], SamplingParams(max_tokens=4), lambda s: None)
    while not warm.done:
        await asyncio.sleep(0.01)
    prof = cProfile.Profile() if profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    for p in prompts:
        engine.open(p, params, notify)
    await done.wait()
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await engine.shutdown()
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    tokens = streams * output_len
    return dict(bench="host_path", streams=streams, output_len=output_len, tokens=tokens, frames=frames[0],
                cpu_us_per_token=round(cpu / tokens * 1e6, 1), wall_us_per_token=round(wall / tokens * 1e6, 1),
                **run_fields())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    install_stand_in()
    for i, n in enumerate(a.streams):
        print(json.dumps(asyncio.run(run(n, a.output_len, a.profile and i == len(a.streams) - 1))), flush=True)


if __name__ == "__main__":
    main()
