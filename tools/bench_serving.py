"""Online serving through `python -m asyncllm.serve` vs `LLM.generate` on the same requests (workload 3 of
BENCHMARKS.md), GPU or CPU. One JSON line per concurrency level (and run of it: --repeats).

The server runs in its own process; streaming `/v1/completions` clients run in --client-procs other processes
(each with its share of the concurrency), prompts are random token ids (length uniform in --input-len), every
request asks for --output-len tokens with `ignore_eos`, --requests-per-slot x concurrency requests per level
(--repeats runs of it, each with new prompts, against the same server: several samples of a short level for the
price of one server start).
Reported per level (field names as `vllm bench serve`'s): output_throughput (tok/s over duration_s: from the first
request sent to the last one done, whenever the client processes got going), request_throughput, ttft_ms
and itl_ms (mean / p50 / p99; an ITL is the gap between two streamed chunks that carry text: a token whose text the
detokenizer holds back, an incomplete UTF-8 sequence, sends none; text_chunks_per_token says how many did), the
server's split of time to first token (server_queue_ms_mean: arrival to admission, server_prefill_ms_mean:
admission to first token, from its /metrics; the client's TTFT adds HTTP and request handling), the server
process's CPU time per streamed token and its CPU use in cores (from /proc), then `LLM.generate` on the same
requests in a fresh process with max_num_seqs = the concurrency once the server has exited (timed as a whole,
after a warm-up), and http_over_offline.

--stand-in replaces the model's forward in both processes by a stand-in that costs nothing (the runner still
builds every step's inputs; sampled ids are arbitrary vocabulary ids): what is left is the host path (HTTP,
tokenization, scheduling, detokenization, SSE), measurable on any CPU.

  python tools/bench_serving.py --stand-in --concurrency 16 64           # CPU, the default model's tokenizer
  python tools/bench_serving.py --model DIR --load-format dummy --concurrency 1 16 64 256   # GPU
Extra server flags after `--`, e.g. `-- --stream-interval 4`; the offline run takes the engine flags among them.
`--step-trace FILE`: the server's steps into FILE, the offline run's into FILE.offline (tools/step_trace.py);
`--phase-trace FILE` likewise, each step's phases on the host and its pure GPU time (tools/phase_trace.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import percentile, run_fields  # noqa: E402


def install_stand_in(gpu_ms: float = 0.0) -> None:
    """Every ModelRunner made after this runs no model: the step's inputs are built, the sampled ids invented.
    `gpu_ms` > 0: a simulated device runs each step for that long, one after another from its launch (the wait
    sleeps until it is done, letting the GIL go as a CUDA event's does), and the async engine launches from its
    loop thread as it does with a GPU (AsyncEngine.launch_on_loop)."""
    import torch

    from asyncllm import AsyncEngine
    from asyncllm.engine.runner import ModelRunner
    from asyncllm.engine.step_inputs import StepHandle

    device_free = [0.0]  # the simulated device's queue drains at this time.monotonic()

    class SimulatedStep(StepHandle):
        done_at = 0.0

        def finished(self) -> bool:
            return time.monotonic() >= self.done_at

        def wait(self):  # noqa: ANN202
            time.sleep(max(0.0, self.done_at - time.monotonic()))
            return super().wait()

    def launch(self, batch, broadcast=True, defer=False):  # noqa: ANN001
        inputs = self.prepare(batch)
        n = inputs.sample_rows.numel()
        ids = (torch.arange(n) * 7919 + batch.starts[0]) % 1000 + 10 if n else None
        if not gpu_ms:
            return StepHandle(batch, ids)
        handle = SimulatedStep(batch, ids)
        handle.done_at = device_free[0] = max(device_free[0], time.monotonic()) + gpu_ms / 1e3
        return handle

    ModelRunner.launch = launch
    if gpu_ms:
        AsyncEngine.launch_on_loop = True


def install_step_trace(path: str) -> None:
    """The server writes one line per applied step to `path`: monotonic time (s), prompt tokens, decode rows, GPU
    ms (CUDA events; 0 when not timed), waiting, running, the prompt-token limit (0: none); tools/step_trace.py
    sums them up."""
    from asyncllm.engine.scheduler import Scheduler

    out = open(path, "w", buffering=1)  # line-buffered: the server is terminated, not shut down
    update = Scheduler.update

    def traced(self, batch, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        out.write(f"{time.monotonic():.6f} {batch.num_prompt_tokens} {batch.num_decode_rows} {batch.gpu_ms:.3f} "
                  f"{len(self.waiting)} {len(self.running)} {self.costs.limit() or 0}\n")
        return update(self, batch, *args, **kwargs)

    Scheduler.update = traced


# ---- the server and the offline run, each in its own process ----------------------------------------------------
def install_traces(args: argparse.Namespace) -> None:
    if args.step_trace:
        install_step_trace(args.step_trace)
    if args.phase_trace:
        from phase_trace import install

        install(args.phase_trace)
    if args.launch_in_thread:
        from asyncllm import AsyncEngine

        AsyncEngine.launch_on_loop = False


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    if args.stand_in:
        install_stand_in()
    install_traces(args)
    from asyncllm.serve import run

    return run(argv)


def offline(args: argparse.Namespace, server_argv: list[str]) -> None:
    """Prints one JSON object per run of prompts in --prompts-file (a list of runs): output tokens and seconds of
    `LLM.generate` on them, with the server's engine flags (its HTTP flags do not apply)."""
    if args.stand_in:
        install_stand_in()
    install_traces(args)
    from asyncllm import LLM, SamplingParams
    from asyncllm.serve import engine_kwargs, parse_args, parser

    with open(args.prompts_file) as f:
        runs = json.load(f)
    given, default = (engine_kwargs(parse_args(parser(), argv)) for argv in (server_argv, []))
    flags = {k: v for k, v in given.items() if v != default[k]}  # the flags given; LLM's defaults for the rest
    llm = LLM(args.model, **{**flags, "load_format": args.load_format, "max_num_seqs": args.max_num_seqs,
                             **engine_options(args)})
    params = SamplingParams(**{"temperature": 0.0, **args.extra_body, "max_tokens": args.output_len, "ignore_eos": True})
    llm.generate(runs[0][: min(len(runs[0]), 8)], params, use_tqdm=False)  # warm-up
    for prompts in runs:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        secs = time.perf_counter() - t
        print(json.dumps({"output_tokens": sum(len(o.token_ids) for o in outs), "seconds": secs}), flush=True)


def engine_options(args: argparse.Namespace) -> dict:
    return {"max_model_len": args.max_model_len} if args.max_model_len else {}


# ---- clients ----------------------------------------------------------------------------------------------------
async def _client(url: str, bodies: list[dict], concurrency: int, start_at: float) -> list[tuple]:
    import aiohttp

    await asyncio.sleep(max(0.0, start_at - time.time()))
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
        async def one(body: dict) -> tuple:
            async with sem:
                t0 = time.perf_counter()
                stamps, tokens, error = [], 0, None
                async with s.post(url, json=body) as r:
                    async for line in r.content:
                        if not line.startswith(b"data: {"):
                            continue
                        d = json.loads(line[6:])
                        if "error" in d:
                            error = d["error"]["message"]
                        elif d.get("usage"):
                            tokens = d["usage"]["completion_tokens"]
                        if d.get("choices") and (d["choices"][0].get("text") or d["choices"][0].get("finish_reason")):
                            stamps.append(time.perf_counter() - t0)
                return tokens, stamps, error, t0, time.perf_counter()  # CLOCK_MONOTONIC on Linux: one for all processes

        return await asyncio.gather(*(one(b) for b in bodies))


def client_proc(url: str, bodies: list[dict], concurrency: int, start_at: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_client(url, bodies, concurrency, start_at)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(args: argparse.Namespace, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", *(["--stand-in"] if args.stand_in else []),
           *(["--step-trace", args.step_trace] if args.step_trace else []),
           *(["--phase-trace", args.phase_trace] if args.phase_trace else []),
           *(["--launch-in-thread"] if args.launch_in_thread else []), "--",
           "--port", "0", "--log-level", "warning", "--load-format", args.load_format,
           "--max-num-seqs", str(max(args.concurrency)), *(["--model", args.model] if args.model else []),
           *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if "ready on" in line:
            return proc, line.split("ready on ")[1].strip()
    raise RuntimeError("the server did not start")


STEP_GAUGES = ("asyncllm:decode_step_seconds", "asyncllm:prompt_token_limit")


def server_metrics(url: str) -> dict[str, float]:
    """The server's cumulative (sum, count) of queue and prefill time (/metrics), for the TTFT split of a level, and
    its learned step costs (gauges)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name.startswith(("asyncllm:request_queue_time_seconds_", "asyncllm:request_prefill_time_seconds_")) \
                and name.endswith(("_sum", "_count")) or name in STEP_GAUGES:
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def level(args: argparse.Namespace, url: str, pid: int, concurrency: int, prompts: list[list[int]]) -> dict:
    bodies = [{"prompt": p, "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, **args.extra_body} for p in prompts]
    procs_n = max(1, min(args.client_procs, concurrency))
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    start_at = time.time() + 2.0  # every client process starts sending together
    shares = [bodies[i::procs_n] for i in range(procs_n)]
    slots = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    procs = [ctx.Process(target=client_proc, args=(f"{url}/v1/completions", share, slot, start_at, q))
             for share, slot in zip(shares, slots)]
    for p in procs:
        p.start()
    split0 = server_metrics(url)  # before the clients start sending
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = cpu_seconds(pid)
    results = [r for _ in procs for r in q.get()]
    cpu = cpu_seconds(pid) - cpu0
    wall = max(r[4] for r in results) - min(r[3] for r in results)  # first request sent to last one done
    after = server_metrics(url)
    split = {k: v - split0.get(k, 0.0) for k, v in after.items()}
    for p in procs:
        p.join()
    if args.phase_trace:  # each request's send time, first and last token (perf_counter, as the server's trace)
        with open(f"{args.phase_trace}.clients", "w") as f:
            f.writelines(f"{r[3]:.6f} {r[3] + (r[1][0] if r[1] else 0.0):.6f} {r[4]:.6f}\n" for r in results)
    if args.chunk_times:  # each request's chunk arrivals (perf_counter, the step trace's clock), a line per request
        with open(f"{args.chunk_times}.{concurrency}", "w") as f:
            f.writelines(" ".join(f"{r[3] + s:.6f}" for s in r[1]) + "\n" for r in results)
    errors = [r[2] for r in results if r[2]]
    tokens = sum(r[0] for r in results)
    ttft = [r[1][0] * 1e3 for r in results if r[1]]
    itl = [(b - a) * 1e3 for r in results for a, b in zip(r[1], r[1][1:])]

    def stats(xs: list[float]) -> dict:
        return {"mean": round(sum(xs) / max(1, len(xs)), 2), "p50": round(percentile(xs, 0.5), 2),
                "p99": round(percentile(xs, 0.99), 2)}

    return dict(concurrency=concurrency, requests=len(bodies), completed=len(results) - len(errors),
                errors=errors[:3], output_tokens=tokens, duration_s=round(wall, 3),
                request_throughput=round(len(results) / wall, 2), output_throughput=round(tokens / wall, 1),
                ttft_ms=stats(ttft), itl_ms=stats(itl),
                text_chunks_per_token=round(sum(len(r[1]) for r in results) / max(1, tokens), 4),
                **{f"server_{part}_ms_mean": round(1e3 * split.get(f"asyncllm:request_{part}_time_seconds_sum", 0.0)
                                                   / max(1.0, split.get(f"asyncllm:request_{part}_time_seconds_count", 0.0)), 2)
                   for part in ("queue", "prefill")},
                server_decode_step_ms=round(after.get(STEP_GAUGES[0], 0.0) * 1e3, 3),
                server_prompt_token_limit=int(after.get(STEP_GAUGES[1], 0)),
                server_cpu_s=round(cpu, 3),
                server_cpu_cores=round(cpu / wall, 3), server_cpu_us_per_token=round(cpu / max(1, tokens) * 1e6, 2))


def profiler(path: str, pid: int) -> subprocess.Popen:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    # --gil: only the thread holding the GIL is sampled, i.e. what the one core the process is bound to runs
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "500", "--gil", "-f", "raw", "-o", path, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_offline(args: argparse.Namespace, extra: list[str], concurrency: int,
                runs: list[list[list[int]]]) -> list[dict]:
    """`LLM.generate` on each run of prompts in turn, in one fresh process: a result per run."""
    path = f"/tmp/bench_serving_prompts_{os.getpid()}.json"
    with open(path, "w") as f:
        json.dump(runs, f)
    cmd = [sys.executable, __file__, "--offline", "--prompts-file", path, "--max-num-seqs", str(concurrency),
           "--output-len", str(args.output_len), "--load-format", args.load_format, "--extra-body", json.dumps(args.extra_body),
           *(["--stand-in"] if args.stand_in else []), *(["--model", args.model] if args.model else []),
           *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
           *(["--step-trace", f"{args.step_trace}.offline"] if args.step_trace else []),
           *(["--phase-trace", f"{args.phase_trace}.offline"] if args.phase_trace else []), "--", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError("the offline run failed:\n" + proc.stderr[-3000:])
    results = [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(runs):]]
    return [{"offline_output_throughput": round(r["output_tokens"] / r["seconds"], 1)} for r in results]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (config + tokenizer; default: the bundled SmolLM2)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--stand-in", action="store_true", help="no model math in the server or the offline run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--requests-per-slot", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each level against the same server (new prompts "
                    "each: no prefix-cache hits), each with its offline run: a line per run")
    ap.add_argument("--input-len", type=int, nargs=2, default=[100, 1000], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                    help='sampling fields added to every request (and to the offline run\'s SamplingParams), e.g. '
                         '\'{"repetition_penalty": 1.1}\'')
    ap.add_argument("--profile", metavar="FILE", help="py-spy (on PATH) records the server during the last level into "
                    "FILE (raw folded stacks)")
    ap.add_argument("--step-trace", metavar="FILE", help="the server writes a line per step into FILE (see "
                    "install_step_trace; summed up by tools/step_trace.py)")
    ap.add_argument("--chunk-times", metavar="FILE", help="each request's chunk arrival times into FILE.<concurrency> "
                    "(one line per request; the step trace's clock)")
    ap.add_argument("--phase-trace", metavar="FILE", help="the server writes each step's phases into FILE (see "
                    "tools/phase_trace.py, which sums them up)")
    ap.add_argument("--launch-in-thread", action="store_true", help="the server launches its steps from the step "
                    "thread, as without a GPU (AsyncEngine.launch_on_loop; for comparison)")
    # internal: the processes this script starts
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--offline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--max-num-seqs", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        sys.exit(serve(args, extra))
    if args.offline:
        offline(args, extra)
        return
    common = run_fields()
    rng = random.Random(args.seed)
    levels = [(c, [[[rng.randrange(10, 10000) for _ in range(rng.randint(*args.input_len))]
                    for _ in range(c * args.requests_per_slot)] for _ in range(args.repeats)])
              for c in args.concurrency]  # (concurrency, runs of prompts)
    lines: list[list[dict]] = []
    server, url = start_server(args, extra)
    try:
        for concurrency, runs in levels:
            level(args, url, server.pid, concurrency, runs[0][: min(len(runs[0]), 4)])  # warm-up
            spy = profiler(args.profile, server.pid) if args.profile and concurrency == levels[-1][0] else None
            lines.append([dict(bench="serving", mode="stand-in" if args.stand_in else "model",
                               model=args.model or "SmolLM2", load_format=args.load_format, output_len=args.output_len,
                               input_len=args.input_len, server_args=extra, extra_body=args.extra_body,
                               **({"launch_in_thread": True} if args.launch_in_thread else {}),
                               **({"repeat": i} if args.repeats > 1 else {}),
                               **level(args, url, server.pid, concurrency, prompts)) for i, prompts in enumerate(runs)])
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
                spy.wait()
    finally:
        server.terminate()
        server.wait()
    for runs_lines, (concurrency, runs) in zip(lines, levels):  # the server is gone: the GPU is the offline run's
        offline_runs = [] if args.no_offline else run_offline(args, extra, concurrency, runs)
        for line, off in zip(runs_lines, offline_runs or [{}] * len(runs_lines)):
            if off:
                line.update(off)
                line["http_over_offline"] = round(line["output_throughput"] / line["offline_output_throughput"], 3)
            print(json.dumps({**line, **common}), flush=True)

if __name__ == "__main__":
    main()
