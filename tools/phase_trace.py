"""Where each engine-loop iteration's time goes, on the host and on the GPU (`bench_serving.py --phase-trace FILE`).

`install(path)` makes the process write one line per loop iteration (when the next one schedules): the
perf_counter times (s) at which it began and ended scheduling, the launch (on the loop thread with a GPU, else in
the step thread), the wait for the step before (step thread), the update and (AsyncEngine) the delivery of the
step applied before (with a GPU: between the launch and the wait; else after the update); then the waited step's
pure GPU time (ms, CUDA events from just before its graph replay to after its sampling: decode graph steps only,
else 0), its rows and prompt tokens. Unlike `--step-trace`'s gpu_ms, whose start event is recorded before the
step's inputs are prepared, the pure time leaves out host work the GPU waited for.

`python tools/phase_trace.py FILE...`: per file, one JSON line of mean ms per phase over the decode-only steps
with at least 90% of the most rows seen (the steady state of a full batch): period (schedule start to the next),
schedule, to_launch (a hand-off to the step thread, if any), launch, to_wait (from the launch or the delivery after
it), wait (blocked on the GPU: the host was ahead), to_update (hand-off back to the loop), update, deliver, to_next,
gpu_pure.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
from typing import Any

KEYS = ("s0", "s1", "l0", "l1", "w0", "w1", "u0", "u1", "d0", "d1")


def install(path: str) -> None:
    import torch

    from asyncllm.engine import async_engine, core, cuda_graphs, runner, step_inputs

    out = open(path, "w", buffering=1 << 16)
    atexit.register(out.flush)
    now, cur, start_event = time.perf_counter, {}, []

    def line() -> None:
        out.write(" ".join(f"{cur.get(k, 0.0):.6f}" for k in KEYS)
                  + f" {cur.get('gpu', 0.0):.4f} {cur.get('rows', 0)} {cur.get('prompt', 0)}\n")
        cur.clear()

    def timed(cls: Any, name: str, key: str, first: bool = False) -> None:
        """Time cls.name into cur[key + "0"/"1"]; `first`: it begins an iteration (the one before is written)."""
        orig = getattr(cls, name)

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if first and cur:
                line()
            cur[key + "0"] = now()
            try:
                return orig(self, *args, **kwargs)
            finally:
                cur[key + "1"] = now()

        setattr(cls, name, call)

    timed(core.EngineCore, "schedule", "s", first=True)
    timed(core.EngineCore, "update", "u")
    timed(runner.ModelRunner, "launch", "l")

    graph_forward = cuda_graphs.CudaGraphs.forward

    def forward(self: Any, step: Any) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        start_event.append(event)
        return graph_forward(self, step)

    cuda_graphs.CudaGraphs.forward = forward
    finish = runner.ModelRunner._finish

    def finished(self: Any, step: Any, masks: Any) -> Any:
        handle = finish(self, step, masks)
        if start_event:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            handle.phase_events = (start_event.pop(), end)
        return handle

    runner.ModelRunner._finish = finished
    wait = step_inputs.StepHandle.wait

    def waited(self: Any) -> Any:
        cur["w0"] = now()
        result = wait(self)
        cur["w1"] = now()
        events = getattr(self, "phase_events", None)
        cur["gpu"] = events[0].elapsed_time(events[1]) if events else 0.0
        cur["rows"], cur["prompt"] = len(self.batch.requests), self.batch.num_prompt_tokens
        return result

    step_inputs.StepHandle.wait = waited
    deliver = async_engine.AsyncEngine._deliver

    def delivered(self: Any, reqs: Any) -> None:
        if not reqs:
            return deliver(self, reqs)
        cur["d0"] = now()
        deliver(self, reqs)
        cur["d1"] = now()

    async_engine.AsyncEngine._deliver = delivered
    # requests' intake, into path + ".intake": "h t" when a handler starts parsing its body, "o t" when its request
    # reaches the engine (perf_counter, CLOCK_MONOTONIC: the clients' clock too)
    from asyncllm.server import app

    intake = open(path + ".intake", "w", buffering=1 << 16)
    atexit.register(intake.flush)
    parse, open_stream = app.parse, async_engine.AsyncEngine.open

    async def parsed(request: Any, schema: Any) -> Any:
        intake.write(f"h {now():.6f}\n")
        return await parse(request, schema)

    def opened(self: Any, *args: Any, **kwargs: Any) -> Any:
        intake.write(f"o {now():.6f}\n")
        return open_stream(self, *args, **kwargs)

    app.parse = parsed
    async_engine.AsyncEngine.open = opened


def summary(path: str) -> dict:
    import numpy as np

    a = np.loadtxt(path, ndmin=2)
    s0, s1, l0, l1, w0, w1, u0, u1, d0, d1, gpu, rows, prompt = a.T
    offline = not d0.any()
    sel = (rows >= 0.9 * rows.max()) & (prompt == 0) & (l0 > 0)
    sel[-1] = False  # its period runs into the next line
    nxt = np.r_[s0[1:], 0.0]

    def ms(x: np.ndarray) -> float:
        return round(float(x[sel].mean()) * 1e3, 3) if sel.any() else 0.0

    return dict(trace=path, loop="offline" if offline else "async", steps=int(sel.sum()),
                rows=round(float(rows[sel].mean()), 1) if sel.any() else 0.0, period=ms(nxt - s0),
                schedule=ms(s1 - s0), to_launch=ms(l0 - s1), launch=ms(l1 - l0), to_wait=ms(w0 - np.maximum(l1, d1)),
                wait=ms(w1 - w0), to_update=ms(u0 - w1), update=ms(u1 - u0), deliver=0.0 if offline else ms(d1 - d0),
                to_next=ms(nxt - np.maximum(u1, d1)),
                gpu_pure=round(float(gpu[sel].mean()), 3) if sel.any() else 0.0)


def intake_summary(path: str) -> dict:
    """From FILE.intake and FILE.clients (bench_serving's level): how long the k-th request sent waited for the
    k-th handler to start (ms; sends and handler starts each in time order), and time to first token (ms) of the
    first `concurrency` requests sent (they arrive together) and of the rest (each sent when one finished)."""
    import numpy as np

    clients = np.loadtxt(path + ".clients", ndmin=2)
    sent = np.sort(clients[:, 0])
    with open(path + ".intake") as f:
        handlers = np.sort([float(t) for kind, t in (line.split() for line in f) if kind == "h"])
    handlers = handlers[-len(sent):]  # the level's (the server's warm-up requests come first)
    lag = (handlers - sent) * 1e3
    order = np.argsort(clients[:, 0])
    ttft = (clients[order, 1] - clients[order, 0]) * 1e3
    burst = int(np.sum(clients[:, 0] < sent[0] + 0.1))  # sent within 100 ms of the first

    def q(x: np.ndarray) -> dict:
        return {k: round(float(np.percentile(x, p)), 1) for k, p in (("p50", 50), ("p99", 99), ("max", 100))} \
            if len(x) else {}

    return dict(trace=path, requests=len(sent), burst=burst, handler_lag_ms=q(lag), ttft_burst_ms=q(ttft[:burst]),
                ttft_rest_ms=q(ttft[burst:]))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(summary(p)), flush=True)
        if os.path.exists(p + ".intake") and os.path.exists(p + ".clients"):
            print(json.dumps(intake_summary(p)), flush=True)
