"""Structured outputs' cost: output tok/s of one offline batch where a fraction of the requests follow a JSON
schema, against the same batch with none (baseline, same run), and the grammar library's mask time per token.

Every request makes exactly --output-len tokens (ignore_eos; the schema asks for 1000 array items, so no
constrained request completes early), so the runs differ only in the masks. Also the constrained requests' own
tok/s: under overlap scheduling a constrained request needs its previous token on the host before its next mask.
    python tools/bench_structured.py --model DIR [--load-format dummy] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import random
import time

from bench_common import run_fields

from asyncllm import LLM, SamplingParams
from asyncllm.sampling_params import StructuredOutputs

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1000,
                                                     "items": {"type": "string", "maxLength": 12}}},
          "required": ["items"]}


def mask_cost(llm: LLM, tokens: int) -> dict:
    """xgrammar's bitmask fill per token along one constrained output (us): median and p90."""
    import xgrammar

    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, seed=0, max_tokens=tokens, ignore_eos=True,
                                                     structured_outputs=StructuredOutputs(json=SCHEMA)), use_tqdm=False)
    grammars = llm.engine.grammars
    matcher = grammars.matcher(StructuredOutputs(json=SCHEMA))
    bitmask = xgrammar.allocate_token_bitmask(1, grammars.vocab_size)
    times = []
    for t in out.token_ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - start)
        matcher.accept_token(t)
    times.sort()
    return {"mask_us_p50": round(1e6 * times[len(times) // 2], 1), "mask_us_p90": round(1e6 * times[len(times) * 9 // 10], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF directory (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    args = ap.parse_args()
    llm = LLM(args.model, load_format=args.load_format, device=args.device, max_model_len=1024)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 10000) for _ in range(rng.randint(50, 200))] for _ in range(args.num_requests)]
    spec = StructuredOutputs(json=SCHEMA)
    llm.generate(prompts[:8], SamplingParams(max_tokens=16, ignore_eos=True, structured_outputs=spec), use_tqdm=False)
    base = None
    for fraction in args.fractions:
        k = round(fraction * len(prompts))
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=spec if i < k else None) for i in range(len(prompts))]
        best = None
        for _ in range(2):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            best = wall if best is None or wall < best else best
        assert all(len(o.token_ids) == args.output_len for o in outs)
        tokens = sum(len(o.token_ids) for o in outs)
        line = {"bench": "structured_outputs", "requests": len(prompts), "constrained": k, "output_len": args.output_len,
                "output_tok_per_s": round(tokens / best, 1), "wall_s": round(best, 3)}
        if base is None:
            base = line["output_tok_per_s"]
        line["vs_unconstrained"] = round(line["output_tok_per_s"] / base, 3)
        print(json.dumps({**line, **run_fields(args.device if args.device != "auto" else None)}), flush=True)
    print(json.dumps({"bench": "structured_mask_cost", **mask_cost(llm, args.output_len),
                      **run_fields(args.device if args.device != "auto" else None)}), flush=True)


if __name__ == "__main__":
    main()
