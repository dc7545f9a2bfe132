"""Structured outputs' cost: output tok/s of one offline batch where a fraction of the requests follow a JSON
schema, against the same batch with none (baseline, same run), the grammar library's mask time per token, and its
batch calls' time per step (accept, and the fill at several thread counts) replayed along the constrained outputs.

Every request makes exactly --output-len tokens (ignore_eos; each --schema asks for 1000 array items, so no
constrained request completes early), so the runs differ only in the masks. Also the constrained requests' own
tok/s: under overlap scheduling a constrained request needs its previous token on the host before its next mask.
`--variants` compares how a constrained step waits for its masks (CUDA): behind a StreamGate (the engine's way) or
on the host, each with the grammar thread's short switch interval (the engine's, 0.1 ms; or 20 us) or the
interpreter's 5 ms; and under the gate the grammar work in native workers (the engine's way) or on the step and
grammar threads (python-grammar-work).
    python tools/bench_structured.py --model DIR [--load-format dummy] [--device cuda] [--schema records]
        [--variants engine host-wait]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from types import SimpleNamespace
from collections.abc import Iterator
from typing import Any

from bench_common import run_fields

from asyncllm import LLM, SamplingParams
from asyncllm.engine.grammar import HandoffThread
from asyncllm.sampling_params import StructuredOutputs

# --schema: each asks for 1000 array items, so no constrained request completes early. "strings12" (bounded
# strings) is xgrammar's slow case: a mask inside a length-bounded string checks many tokens at run time (tens to
# hundreds of us); "records" (objects with a free string, an integer, an enum and a boolean) is a typical extraction
# schema, whose masks come mostly from xgrammar's cache.
SCHEMAS = {
    "strings12": {"type": "object", "properties": {"items": {"type": "array", "minItems": 1000,
                                                             "items": {"type": "string", "maxLength": 12}}},
                  "required": ["items"]},
    "records": {"type": "object", "properties": {"people": {"type": "array", "minItems": 1000, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                         "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"}},
        "required": ["name", "age", "role", "active"], "additionalProperties": False}}}, "required": ["people"]},
}


def mask_cost(llm: LLM, spec: StructuredOutputs, tokens: int) -> dict:
    """xgrammar's bitmask fill per token along one constrained output (us): median and p90."""
    import xgrammar

    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, seed=0, max_tokens=tokens, ignore_eos=True,
                                                     structured_outputs=spec), use_tqdm=False)
    grammars = llm.engine.grammars
    matcher = grammars.matcher(spec)
    bitmask = xgrammar.allocate_token_bitmask(1, grammars.vocab_size)
    times = []
    for t in out.token_ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - start)
        matcher.accept_token(t)
    times.sort()
    return {"mask_us_p50": round(1e6 * times[len(times) // 2], 1), "mask_us_p90": round(1e6 * times[len(times) * 9 // 10], 1)}


def batch_cost(llm: LLM, spec: StructuredOutputs, outputs: list[list[int]], threads: list[int],
               splits: tuple[int, ...] | list[int] = (1,)) -> list[dict]:
    """The grammar work of one step for all constrained rows at once, replayed along the bench's own outputs:
    xgrammar's batch accept and batch mask fill (ms per step, mean), the fill with each thread count, made as
    `fill_calls` concurrent batch calls over slices of the rows (each with its share of the threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import xgrammar

    grammars = llm.engine.grammars
    steps = min(len(o) for o in outputs) - 1
    bitmask = torch.empty((len(outputs), -(-grammars.vocab_size // 32)), dtype=torch.int32)
    lines = []
    for n in threads:
        for calls in splits:
            if calls > n:
                continue
            batches = [xgrammar.BatchGrammarMatcher(n // calls) for _ in range(calls)]
            pool = ThreadPoolExecutor(calls)
            matchers = [grammars.matcher(spec) for _ in outputs]
            slices = [list(range(j, len(outputs), calls)) for j in range(calls)]
            fill = accept = 0.0
            for i in range(steps):
                start = time.perf_counter()
                if calls == 1:
                    batches[0].batch_fill_next_token_bitmask(matchers, bitmask)
                else:
                    list(pool.map(lambda j: batches[j].batch_fill_next_token_bitmask(
                        [matchers[r] for r in slices[j]], bitmask, slices[j]), range(calls)))
                mid = time.perf_counter()
                assert all(batches[0].batch_accept_token(matchers, [o[i] for o in outputs]))
                fill, accept = fill + mid - start, accept + time.perf_counter() - mid
            pool.shutdown()
            lines.append({"bench": "structured_step_grammar", "rows": len(outputs), "fill_threads": n,
                          "fill_calls": calls, "fill_ms_per_step": round(1e3 * fill / steps, 3),
                          "accept_ms_per_step": round(1e3 * accept / steps, 3)})
    lines.append({"bench": "structured_step_rows", "rows": len(outputs), **row_costs(grammars, spec, outputs, steps)})
    lines.append({"bench": "structured_step_native", "rows": len(outputs), **native_cost(grammars, spec, outputs, steps)})
    lines.append({"bench": "structured_accept_beside_python", "rows": len(outputs),
                  **accept_beside_python(grammars, spec, outputs, min(steps, 64))})
    return lines


def row_costs(grammars: Any, spec: StructuredOutputs, outputs: list[list[int]], steps: int) -> dict:
    """Each row's mask filled alone, step by step along the outputs (ms per step, mean over steps): the sum over a
    step's rows (one thread's work) and the slowest row (a bound under any split of the rows over threads)."""
    import torch

    matchers = [grammars.matcher(spec) for _ in outputs]
    bitmask = torch.empty((len(outputs), -(-grammars.vocab_size // 32)), dtype=torch.int32)
    total = slowest = 0.0
    maxima = []
    for i in range(steps):
        times = []
        for r, m in enumerate(matchers):
            start = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, r)
            times.append(time.perf_counter() - start)
            assert m.accept_token(outputs[r][i])
        total, slowest = total + sum(times), slowest + max(times)
        maxima.append(max(times))
    maxima.sort()
    return {"rows_sum_ms_per_step": round(1e3 * total / steps, 3), "row_max_ms_per_step": round(1e3 * slowest / steps, 3),
            "row_max_ms_p90": round(1e3 * maxima[len(maxima) * 9 // 10], 3)}


def native_cost(grammars: Any, spec: StructuredOutputs, outputs: list[list[int]], steps: int) -> dict:
    """The engine's grammar work under a gate, replayed along the outputs (ms per step, mean): the native workers
    (GrammarWork, fill_threads() of them) take each step's accept of the tokens before and the next masks; the
    caller's share (the hand-over), and the chain from the hand-over to the job done, its gate opened (what the GPU
    would wait for beyond its forward). Compare with structured_step_grammar's accept + fill (the Python path's
    chain without its GIL waits)."""
    import torch

    from asyncllm.engine.grammar import fill_threads
    from asyncllm.engine.native_grammar import GrammarWork

    work = GrammarWork.make(fill_threads())
    if work is None:
        return {"native": False}
    reqs = []
    for i in range(len(outputs)):
        m = grammars.matcher(spec)
        reqs.append(SimpleNamespace(grammar=m, grammar_handle=GrammarWork.handle(m), grammar_ended=False,
                                    grammar_refused=False, request_id=str(i)))
    bitmask = torch.empty((len(outputs), -(-grammars.vocab_size // 32)), dtype=torch.int32)
    word = torch.zeros(1, dtype=torch.int32)
    hand = chain = 0.0
    for i in range(steps):
        accept = [(r, o[i - 1]) for r, o in zip(reqs, outputs)] if i else []
        start = time.perf_counter()
        work.submit(accept, reqs, bitmask, word.data_ptr(), i + 1)
        handed = time.perf_counter()
        work.finish()  # sleeps until the job is done (its gate opened just before)
        hand, chain = hand + handed - start, chain + time.perf_counter() - start
        assert word.item() == i + 1
    work.close()
    assert not any(r.grammar_refused for r in reqs)
    return {"native": True, "workers": fill_threads(), "handover_ms_per_step": round(1e3 * hand / steps, 3),
            "chain_ms_per_step": round(1e3 * chain / steps, 3)}


def spin(stop: Any) -> None:
    """Run Python until `stop` is set (a stand-in for an event loop with work to do)."""
    while not stop.is_set():
        pass


def accept_beside_python(grammars: Any, spec: StructuredOutputs, outputs: list[list[int]], steps: int) -> dict:
    """The batch accept (ms per step) while another thread runs Python, as the event loop does beside the step
    thread: tvm-ffi calls that let the GIL go wait up to the switch interval to take it back. With the short calls
    keeping the GIL (the engine's setting) and, for comparison, letting it go (tvm-ffi's default)."""
    import threading

    from asyncllm.engine.grammar import accept_tokens, short_ffi_calls

    fns = short_ffi_calls()
    out = {}
    for label, release in (("keep", False), ("release", True)):
        for fn in fns:
            fn.release_gil = release
        reqs = [SimpleNamespace(grammar=grammars.matcher(spec), grammar_ended=False,
                                grammar_stops=frozenset(), request_id=str(i), grammar_refused=False)
                for i in range(len(outputs))]
        batch = SimpleNamespace(requests=reqs, sample=[True] * len(reqs), extras=list(range(len(reqs))))
        stop = threading.Event()
        spinner = threading.Thread(target=spin, args=(stop,))
        spinner.start()
        start = time.perf_counter()
        for i in range(steps):
            accept_tokens(batch, [o[i] for o in outputs])
        out[f"accept_ms_per_step_gil_{label}"] = round(1e3 * (time.perf_counter() - start) / steps, 3)
        stop.set()
        spinner.join()
        assert not any(r.grammar_refused for r in reqs)
    for fn in fns:
        fn.release_gil = False
    return out


def workload_args(ap: argparse.ArgumentParser, num_requests: int, output_len: int) -> None:
    """The model and batch arguments (this tool's and tools/trace_structured.py's)."""
    ap.add_argument("--model", default=None, help="HF directory (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-requests", type=int, default=num_requests)
    ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--schema", default="strings12", choices=sorted(SCHEMAS),
                    help="what the constrained requests follow")


def workload(args: Any) -> tuple[LLM, list[list[int]]]:
    """The engine and the batch's prompts."""
    llm = LLM(args.model, load_format=args.load_format, device=args.device, max_model_len=1024)
    return llm, random_prompts(random.Random(0), args.num_requests)


def random_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Random token ids, 50-200 per prompt. Each timed run takes new ones (and new seeds): a repeated request
    would find its prompt and its whole seeded output in the prefix cache, which a served batch does not."""
    return [[rng.randrange(10, 10000) for _ in range(rng.randint(50, 200))] for _ in range(n)]


def schema_spec(args: Any) -> StructuredOutputs:
    return StructuredOutputs(json=SCHEMAS[args.schema])


def batch_params(n: int, constrained: int, output_len: int, spec: StructuredOutputs,
                 first_seed: int = 0) -> list[SamplingParams]:
    """Every request exactly `output_len` tokens; the first `constrained` follow `spec`."""
    return [SamplingParams(temperature=1.0, seed=first_seed + i, max_tokens=output_len, ignore_eos=True,
                           structured_outputs=spec if i < constrained else None) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, 64, 128)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--fill-threads", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="xgrammar batch-fill thread counts to time on the constrained outputs")
    ap.add_argument("--fill-calls", type=int, nargs="+", default=[1],
                    help="concurrent batch-fill calls the rows are split over (the threads shared among them)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each fraction per variant (best counts)")
    ap.add_argument("--variants", nargs="+", default=["engine"], choices=sorted(VARIANTS),
                    help="how a constrained step waits for its masks (CUDA, overlap): each runs every fraction")
    args = ap.parse_args()
    llm, prompts = workload(args)
    spec = schema_spec(args)
    llm.generate(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True, structured_outputs=spec), use_tqdm=False)
    constrained: list[list[int]] = []
    for variant in args.variants:
        constrained = run_variant(llm, args, prompts, variant) or constrained
    fields = {"schema": args.schema, **run_fields(args.device if args.device != "auto" else None)}
    print(json.dumps({"bench": "structured_mask_cost", **mask_cost(llm, spec, args.output_len), **fields}), flush=True)
    if constrained:
        for line in batch_cost(llm, spec, constrained, args.fill_threads, args.fill_calls):
            print(json.dumps({**line, **fields}), flush=True)


# how a constrained step waits for its masks: (the engine's StreamGate on, the grammar thread's switch interval,
# the accept / fill / gate opening in native workers (GrammarWork) rather than the step and grammar threads)
VARIANTS = {"engine": (True, HandoffThread.switch_interval, True),
            "python-grammar-work": (True, HandoffThread.switch_interval, False),
            "host-wait": (False, HandoffThread.switch_interval, False), "gate-5ms-switch": (True, None, False),
            "host-wait-5ms-switch": (False, None, False), "gate-20us-switch": (True, 2e-5, False)}


@contextlib.contextmanager
def gate_stalls() -> Iterator[list]:
    """Timing events recorded on the stream around each StreamGate wait queued meanwhile (CUDA)."""
    from asyncllm.engine.stream_gate import StreamGate

    pairs: list = []
    close = StreamGate.close

    def timed(gate: StreamGate) -> int:
        import torch

        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(gate.stream)
        ticket = close(gate)
        after.record(gate.stream)
        pairs.append((before, after))
        return ticket

    StreamGate.close = timed  # type: ignore[method-assign]
    try:
        yield pairs
    finally:
        StreamGate.close = close  # type: ignore[method-assign]
    if pairs:
        pairs[-1][1].synchronize()


def run_variant(llm: LLM, args: Any, prompts: list[list[int]], variant: str) -> list[list[int]]:
    """One line per fraction (the first fraction, 0 by default, is the baseline): the best of --repeats runs, the
    fractions taking turns (so a drift of the host's speed hits each alike); returns the constrained outputs."""
    gate, switch, native = VARIANTS[variant]
    llm.engine.gate_masks = gate and llm.engine.runner.stream is not None
    llm.engine.native_grammar = native
    HandoffThread.switch_interval = switch
    counts = [round(fraction * len(prompts)) for fraction in args.fractions]
    best: dict[int, float] = {}
    stalls: dict[int, list] = {k: [] for k in counts}
    constrained: list[list[int]] = []
    rng = random.Random(1)
    for run in range(args.repeats):
        for k in counts:
            prompts = random_prompts(rng, len(prompts))
            params = batch_params(len(prompts), k, args.output_len, schema_spec(args),
                                  first_seed=(run + 1) * len(prompts))
            with gate_stalls() as pairs:
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - start
            stalls[k] += pairs
            best[k] = min(wall, best.get(k, wall))
            assert all(len(o.token_ids) == args.output_len for o in outs)
            if k:
                constrained = [o.token_ids for o in outs[:k]]
    base = None
    for k in counts:
        tokens = len(prompts) * args.output_len
        line = {"bench": "structured_outputs", "variant": variant, "schema": args.schema, "requests": len(prompts),
                "constrained": k,
                "output_len": args.output_len, "repeats": args.repeats, "output_tok_per_s": round(tokens / best[k], 1),
                "wall_s": round(best[k], 3)}
        if k == 0:
            base = line["output_tok_per_s"]
        if base is not None:  # against the run with no request constrained (when one ran first)
            line["vs_unconstrained"] = round(line["output_tok_per_s"] / base, 3)
        if stalls[k]:  # the GPU's wait at the gates (every run): ~0 means the host's own work per step set the pace
            ms = [a.elapsed_time(b) for a, b in stalls[k]]
            line |= {"gated_steps": len(ms), "gate_stall_ms_mean": round(sum(ms) / len(ms), 3),
                     "gate_stall_ms_p90": round(sorted(ms)[len(ms) * 9 // 10], 3)}
        print(json.dumps({**line, **run_fields(args.device if args.device != "auto" else None)}), flush=True)
    return constrained


if __name__ == "__main__":
    main()
