"""Where a batch with grammar-constrained requests spends its host time: timers around the engine's calls during one
`LLM.generate` of bench_structured's batch (--fraction of the requests following its --schema; new prompts and
seeds after a warm-up), one JSON line with the mean per call (µs) of the main thread's schedule / launch (and in it
the mask buffers, the gate's close, the queued sampling: the masks' copy, their kernel, the sampling graph) /
collect's wait / accept / submit / update, the grammar thread's mask fill (`MaskFill.run`), and the chain from a
fill's submit to its gate opening (CUDA); with the native grammar workers (the engine's default under a gate),
their job's submit and finish instead. The main thread sets the pace when its calls add up to the step period and
it hardly waits; the chain does when the GPU waits at the gate (bench_structured's gate_stall_ms).
    python tools/trace_structured.py --model DIR [--load-format dummy] [--num-requests 128] [--output-len 256]
        [--schema records] [--fraction 0]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from typing import Any

from bench_common import run_fields
from bench_structured import batch_params, random_prompts, schema_spec, workload, workload_args

import asyncllm.engine.core as core_module
from asyncllm.engine.core import EngineCore
from asyncllm.engine.cuda_graphs import CudaGraphs
from asyncllm.engine.grammar import HandoffThread, HostMasks, MaskFill, TokenMask
from asyncllm.engine.native_grammar import GrammarWork
from asyncllm.engine.runner import ModelRunner
from asyncllm.engine.step_inputs import StepHandle
from asyncllm.engine.stream_gate import StreamGate

CALLS = [(EngineCore, "schedule"), (EngineCore, "launch"), (EngineCore, "update"), (StepHandle, "wait"),
         (core_module, "accept_tokens"), (HandoffThread, "submit"), (MaskFill, "run"), (StreamGate, "open"),
         (StreamGate, "close"), (ModelRunner, "mask_job"), (ModelRunner, "complete"),
         (GrammarWork, "submit", "work_submit"), (GrammarWork, "finish", "work_finish"),
         (HostMasks, "to", "masks_to_device"), (TokenMask, "apply", "mask_apply"), (CudaGraphs, "sample", "graph_sample")]


def timed(spans: dict[str, list[tuple[float, float]]], on: list[bool]) -> None:
    """Wrap CALLS to note (start, end) of each call while on[0] (under its name, or the label given)."""
    for owner, name, *label in CALLS:
        fn = getattr(owner, name)

        def wrapper(*args: Any, _fn: Any = fn, _name: str = (label or [name])[0], **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                if on[0]:
                    spans[_name].append((start, time.perf_counter()))

        setattr(owner, name, wrapper)


def chain_us(spans: dict[str, list[tuple[float, float]]]) -> float | None:
    """Mean time from a fill's submit to the next gate opening after it (the grammar thread's part of the chain)."""
    opens = sorted(s for s, _ in spans.get("open", []))
    gaps = []
    for start, _ in spans.get("submit", []):
        later = next((t for t in opens if t >= start), None)
        if later is not None:
            gaps.append(later - start)
    return round(1e6 * sum(gaps) / len(gaps), 1) if gaps else None


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, 128, 256)
    ap.add_argument("--fraction", type=float, default=0.5, help="of the requests constrained")
    ap.add_argument("--python-grammar-work", action="store_true",
                    help="the accept and fill on the step and grammar threads, not the native workers")
    args = ap.parse_args()
    llm, prompts = workload(args)
    llm.engine.native_grammar = not args.python_grammar_work
    constrained = round(args.fraction * len(prompts))
    params = batch_params(len(prompts), constrained, args.output_len, schema_spec(args))
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    on = [False]
    timed(spans, on)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    prompts = random_prompts(random.Random(1), len(prompts))  # new prompts and seeds: nothing in the prefix cache
    params = batch_params(len(prompts), constrained, args.output_len, schema_spec(args), first_seed=len(prompts))
    on[0] = True
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    on[0] = False
    steps = len(spans["schedule"])
    line: dict[str, Any] = {"bench": "structured_host_trace", "schema": args.schema, "requests": len(prompts),
                            "constrained": constrained, "native_grammar_work": not args.python_grammar_work,
                            "output_len": args.output_len, "steps": steps, "wall_us_per_step": round(1e6 * wall / steps, 1)}
    for name, xs in spans.items():
        line[f"{name}_us"] = round(1e6 * sum(b - a for a, b in xs) / len(xs), 1)
        line[f"{name}_calls"] = len(xs)
    line["submit_to_gate_open_us"] = chain_us(spans)
    print(json.dumps({**line, **run_fields(args.device if args.device != "auto" else None)}), flush=True)


if __name__ == "__main__":
    main()
