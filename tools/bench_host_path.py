"""The serving host path in one process, without sockets or a model: AsyncEngine with the stand-in runner (step
inputs built, sampled ids invented) behind the server's own `/v1/completions` handler, N streaming requests made
as aiohttp requests over stand-in connections (each write counted, nothing sent; made before the timed run since
2026-12-05). CPU seconds per streamed token isolate the loop's own per-token and per-step work (request handling,
delivery, detokenization, SSE framing, scheduling, step preparation) from sockets and clients; the split by phase
(µs per token) times the engine loop's calls: schedule, launch, collect (the wait), update, deliver. One JSON line per stream count; `--profile` adds a
cProfile table (stderr) of the last one (SORT=cumulative to sort it so, TOP=N for N rows). `--gpu-ms T` stands
in a simulated device that runs each step for T ms (overlap on, steps launched from the loop thread as with a GPU;
`--launch-in-thread` from the step thread): wall time per token against device_us_per_token shows whether the host
keeps up.
    python tools/bench_host_path.py --streams 64 256
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import random
import sys
import time
from typing import Any

import orjson
import uvloop
from aiohttp import streams, web
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request

from bench_common import run_fields
from bench_serving import install_stand_in


class Connection:
    """A client connection that takes every write at once: aiohttp's protocol and transport, as far as used."""

    def __init__(self) -> None:
        self.transport = self  # the protocol's transport
        self.writes = 0
        self.ssl_context = self.peername = self.sockname = None
        self._paused = self.writing_paused = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: list[bytes]) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    async def _drain_helper(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def timed(phases: dict[str, float], obj: Any, name: str) -> None:
    """Add the time spent in obj.name to phases[name]."""
    f = getattr(obj, name)

    def call(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return f(*args)
        finally:
            phases[name] += time.perf_counter() - t

    setattr(obj, name, call)


async def run(streams_: int, output_len: int, profile: bool, gpu_ms: float) -> dict:
    from asyncllm import AsyncEngine
    from asyncllm.serve import quiet_gc
    from asyncllm.server.app import ServerSettings, build_app

    engine = AsyncEngine(None, max_model_len=2048, max_num_seqs=streams_, num_kv_blocks=12000,
                         overlap_schedule=gpu_ms > 0)
    await engine.start()
    app = build_app(engine, ServerSettings("m"))
    loop = asyncio.get_running_loop()
    rng = random.Random(0)
    bodies = [orjson.dumps({"prompt": [rng.randrange(10, 10000) for _ in range(rng.randint(100, 400))],
                            "max_tokens": output_len, "ignore_eos": True, "temperature": 0, "stream": True})
              for _ in range(streams_)]

    def make(body: bytes) -> tuple[Connection, web.Request]:
        """A request over a stand-in connection (aiohttp's test utility: its mocks cost about a millisecond, so
        they are made before the timed run, not counted as the server's work)."""
        conn = Connection()
        payload = streams.StreamReader(conn, 1 << 16, loop=loop)  # type: ignore[arg-type]
        payload.feed_data(body)
        payload.feed_eof()
        req = make_mocked_request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, app=app,
                                  writer=StreamWriter(conn, loop), transport=conn, protocol=conn, payload=payload)
        return conn, req

    async def serve(conn: Connection, req: web.Request) -> int:
        match = await app.router.resolve(req)
        await match.handler(req)
        return conn.writes

    await serve(*make(orjson.dumps({"prompt": [5, 6, 7], "max_tokens": 4, "stream": True})))  # warm-up
    ready = [make(b) for b in bodies]
    quiet_gc()  # the garbage collector set as the server sets it once the engine is up
    phases = dict.fromkeys(("schedule", "launch", "collect", "update"), 0.0)
    phases["_deliver"] = 0.0
    for name in ("schedule", "launch", "collect", "update"):
        timed(phases, engine.core, name)
    timed(phases, engine, "_deliver")
    prof = cProfile.Profile() if profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    writes = sum(await asyncio.gather(*(serve(conn, req) for conn, req in ready)))
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    gc.unfreeze()
    await engine.shutdown()
    if prof:
        stats = pstats.Stats(prof, stream=sys.stderr).sort_stats(os.environ.get("SORT", "tottime"))
        stats.print_stats(int(os.environ.get("TOP", "25")))
    tokens = streams_ * output_len
    split = {f"{k.strip('_')}_us_per_token": round(v / tokens * 1e6, 2) for k, v in phases.items()}
    sim = dict(gpu_ms=gpu_ms, launch_on_loop=bool(AsyncEngine.launch_on_loop),
               device_us_per_token=round(gpu_ms * 1e3 / streams_, 1)) if gpu_ms else {}
    return dict(bench="host_path", streams=streams_, output_len=output_len, tokens=tokens, writes=writes,
                cpu_us_per_token=round(cpu / tokens * 1e6, 1), wall_us_per_token=round(wall / tokens * 1e6, 1),
                **split, **sim, **run_fields())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--gpu-ms", type=float, default=0.0,
                    help="a simulated device takes this long per step (overlap on): wall time per token then shows "
                         "how close the host keeps up with it (device_us_per_token)")
    ap.add_argument("--launch-in-thread", action="store_true",
                    help="with --gpu-ms: launch from the step thread, as the engine does without a GPU")
    a = ap.parse_args()
    install_stand_in(a.gpu_ms)
    if a.launch_in_thread:
        from asyncllm import AsyncEngine

        AsyncEngine.launch_on_loop = False
    for i, n in enumerate(a.streams):
        last = i == len(a.streams) - 1
        print(json.dumps(uvloop.run(run(n, a.output_len, a.profile and last, a.gpu_ms))), flush=True)


if __name__ == "__main__":
    main()
