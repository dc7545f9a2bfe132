"""Shared-prefix workload through the server, prefix cache on vs off, in one run (issue: prefix caching).

S system prompts of L tokens, Q questions of 50 tokens each (S*Q requests, system-prompt-major order), answers of
A tokens (ignore_eos), C requests in flight. Prompts are random token ids, so any model directory works, including
a config-only one with --load-format dummy.  One JSON line per result.
    python tools/bench_prefix_cache.py [--systems 32 --system-len 1000 --questions 8 --answer 128 --concurrency 16]
                                       [-- server flags, e.g. --model DIR --load-format dummy --device cuda]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from sse_client import common_fields, emit, load, percentile, start_server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", type=int, default=32)
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--question-len", type=int, default=50)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--device-name", default=None, help="device string for the JSON lines")
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: flags for asyncllm.serve")
    a = ap.parse_args()
    server_args = [x for x in a.server_args if x != "--"]
    rng = random.Random(0)
    systems = [[rng.randrange(100, 20000) for _ in range(a.system_len)] for _ in range(a.systems)]
    bodies = [{"prompt": sys_ + [rng.randrange(100, 20000) for _ in range(a.question_len)], "max_tokens": a.answer,
               "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for sys_ in systems for _ in range(a.questions)]
    common = dict(common_fields(a.device_name), systems=a.systems, system_len=a.system_len, questions=a.questions,
                  answer=a.answer, concurrency=a.concurrency, server_args=" ".join(server_args))
    rates = {}
    for cache in ("on", "off"):
        flag = "--enable-prefix-caching" if cache == "on" else "--no-enable-prefix-caching"
        proc, url = start_server([*server_args, flag])
        try:
            warm = [{**bodies[0], "prompt": [7] * 64, "max_tokens": 4}]
            asyncio.run(load(f"{url}/v1/completions", warm, 1))
            results, secs = asyncio.run(load(f"{url}/v1/completions", bodies, a.concurrency))
        finally:
            proc.terminate()
            proc.wait()
        ttfts = [r[1] * 1e3 for r in results]
        toks = sum(r[0] for r in results)
        prompt_toks = sum(len(b["prompt"]) for b in bodies)
        rates[cache] = (toks / secs, statistics.mean(ttfts))
        emit(bench="prefix_cache", cache=cache, requests=len(bodies), seconds=round(secs, 2),
             output_tok_per_s=round(toks / secs, 1), ttft_mean_ms=round(statistics.mean(ttfts), 1),
             ttft_median_ms=round(statistics.median(ttfts), 1), ttft_p99_ms=round(percentile(ttfts, 0.99), 1),
             cached_prompt_tokens=sum(r[3] for r in results), prompt_tokens=prompt_toks, **common)
    emit(bench="prefix_cache", metric="on_over_off", throughput_ratio=round(rates["on"][0] / rates["off"][0], 2),
         ttft_speedup=round(rates["off"][1] / rates["on"][1], 2), **common)


if __name__ == "__main__":
    main()
