"""Shared by the serving benchmarks: a streaming load client, server start-up, percentiles, JSON lines."""
from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time

import aiohttp
from bench_common import percentile, run_fields  # noqa: F401  (percentile: re-exported to the serving benchmarks)


def common_fields(device: str | None = None) -> dict:
    return run_fields(device or f"cpu {platform.machine()}")


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def stream_one(session, url, body):
    """One streaming request -> (completion tokens, TTFT seconds, latency seconds, cached prompt tokens)."""
    t0 = time.perf_counter()
    ttft, tokens, cached = None, 0, 0
    async with session.post(url, json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                d = json.loads(line[6:])
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
                    cached = (d["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return tokens, ttft, time.perf_counter() - t0, cached


async def load(url, bodies, concurrency):
    """Send `bodies` in order with at most `concurrency` in flight -> (per-request results, wall seconds)."""
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as s:
        async def run(b):
            async with sem:
                return await stream_one(s, url, b)

        t = time.perf_counter()
        results = await asyncio.gather(*(run(b) for b in bodies))
        return results, time.perf_counter() - t


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m asyncllm.serve --port 0 ARGS` -> (process, base URL) once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "asyncllm.serve", "--port", "0", "--log-level", "warning", *args],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "ready on" in line:
            return proc, line.split("ready on ")[1].strip()
    raise RuntimeError("server did not start")
