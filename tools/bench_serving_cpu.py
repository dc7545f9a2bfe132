"""Serving overhead on CPU (workload 4 of BENCHMARKS.md), and what HTTP costs over LLM.generate (SmolLM2).

Part 1, --stand-in: the real server, engine loop, scheduler and input preparation, with a stand-in model whose
forward costs nothing (the runner builds the step's tensors, then returns token ids without any math).
N concurrent streaming clients: requests/s, streamed tokens/s, and the server's event-loop lag (p50/p99 delay
of a 1 ms timer, measured inside the server process).
Part 2, --real: SmolLM2 through `python -m asyncllm.serve` at 1 and 16 concurrent clients vs `LLM.generate` on the
same prompts, in the same run.      python tools/bench_serving_cpu.py [--stand-in] [--real]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import time

import aiohttp
from sse_client import common_fields, emit as _emit, load, percentile, start_server

COMMON = common_fields()


def emit(**fields):
    _emit(**fields, **COMMON)


# ---- the server process ---------------------------------------------------------------------------------------
def stand_in_server(port_q, model_dir: str) -> None:
    import torch
    import uvloop
    from aiohttp import web

    from asyncllm import AsyncEngine
    from asyncllm.engine.step_inputs import StepHandle
    from asyncllm.server.app import ServerSettings, build_app, make_runner

    async def main():
        engine = AsyncEngine(model_dir, load_format="dummy", max_model_len=2048, max_num_seqs=256, num_kv_blocks=20000)
        await engine.start()
        runner = engine.core.runner

        def launch(batch):  # same data preparation, no model
            inputs = runner.prepare(batch)
            return StepHandle(batch, torch.arange(inputs.sample_rows.numel()) % 1000 + 10)

        runner.launch = launch
        lags: list[float] = []

        async def probe():
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        async def lag(request):
            out = {"p50_ms": percentile(lags, 0.5) * 1e3, "p99_ms": percentile(lags, 0.99) * 1e3,
                   "max_ms": max(lags) * 1e3, "samples": len(lags)}
            lags.clear()
            return web.json_response(out)

        app = build_app(engine, ServerSettings("stand-in"))
        app.router.add_get("/bench/lag", lag)
        web_runner = make_runner(app, access_log=None)
        await web_runner.setup()
        await web.TCPSite(web_runner, "127.0.0.1", 0).start()
        asyncio.create_task(probe())
        port_q.put(web_runner.addresses[0][1])
        await asyncio.Event().wait()

    uvloop.run(main())


def stand_in(args, model_dir):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=stand_in_server, args=(q, model_dir), daemon=True)
    proc.start()
    port = q.get(timeout=300)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    try:
        for concurrency in args.concurrency:
            n = concurrency * 4
            bodies = [{"prompt": [rng.randrange(10, 1000) for _ in range(rng.randint(100, 400))], "max_tokens": 128,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}} for _ in range(n)]
            asyncio.run(load(f"{url}/v1/completions", bodies[: min(n, 16)], 16))  # warm-up
            asyncio.run(_get(f"{url}/bench/lag"))
            results, secs = asyncio.run(load(f"{url}/v1/completions", bodies, concurrency))
            lag = asyncio.run(_get(f"{url}/bench/lag"))
            toks = sum(r[0] for r in results)
            emit(bench="serving_overhead_stand_in", concurrency=concurrency, requests=n, seconds=round(secs, 2),
                 requests_per_s=round(n / secs, 1), streamed_tok_per_s=round(toks / secs, 0),
                 loop_lag_p50_ms=round(lag["p50_ms"], 2), loop_lag_p99_ms=round(lag["p99_ms"], 2),
                 loop_lag_max_ms=round(lag["max_ms"], 2), note="client and server share the 2 cores")
    finally:
        proc.terminate()


async def _get(url):
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


def real(args):
    from asyncllm import LLM, SamplingParams
    from asyncllm.model_files import default_model_dir

    model_dir = str(default_model_dir())
    server, url = start_server(["--max-model-len", "1024"])
    try:
        llm = LLM(model_dir, max_model_len=1024)
        rng = random.Random(1)
        prompts = [[rng.randrange(10, 40000) for _ in range(rng.randint(30, 120))] for _ in range(16)]
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
        bodies = [{"prompt": p, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}} for p in prompts]
        llm.generate(prompts[:2], params, use_tqdm=False)
        asyncio.run(load(f"{url}/v1/completions", bodies[:2], 2))  # warm-up both
        for clients, subset in ((1, 4), (16, 16)):
            best = {}
            for _ in range(args.rounds):
                t = time.perf_counter()
                if clients == 1:
                    outs = [o for p in prompts[:subset] for o in llm.generate([p], params, use_tqdm=False)]
                else:
                    outs = llm.generate(prompts[:subset], params, use_tqdm=False)
                offline = (sum(len(o.token_ids) for o in outs), time.perf_counter() - t)
                results, secs = asyncio.run(load(f"{url}/v1/completions", bodies[:subset], clients))
                http = (sum(r[0] for r in results), secs)
                for name, (toks, s) in (("LLM.generate", offline), ("http", http)):
                    if name not in best or s < best[name][1]:
                        best[name] = (toks, s)
            rates = {k: v[0] / v[1] for k, v in best.items()}
            for name, r in rates.items():
                emit(bench="http_vs_offline_smollm2", path=name, clients=clients, output_tokens=best[name][0],
                     tok_per_s=round(r, 1), best_of=args.rounds)
            emit(bench="http_vs_offline_smollm2", metric="http_over_offline", clients=clients,
                 ratio=round(rates["http"] / rates["LLM.generate"], 3))
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stand-in", action="store_true")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[256])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.stand_in or not args.real:
        from asyncllm.model_files import default_model_dir

        stand_in(args, str(default_model_dir()))
    if args.real or not args.stand_in:
        real(args)


if __name__ == "__main__":
    main()
