"""Workload 6 of BENCHMARKS.md: SmolLM2-135M on CPU, asyncllm `LLM.generate` vs transformers `generate`.

Same 16 chat prompts (different lengths), greedy, up to N new tokens, measured in one run, in two modes:
  fixed:   EOS ignored, exactly N tokens per request on both sides (equal work);
  natural: each request stops at EOS (useful tokens only; transformers keeps padded rows running, we do not).
Engines alternate for --rounds rounds and the best time of each counts (this machine is shared and noisy).
One JSON line per result.   python tools/bench_cpu.py [--new-tokens 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from bench_common import run_fields
from transformers import AutoModelForCausalLM

from asyncllm import LLM, SamplingParams
from asyncllm.model_files import default_model_dir

PARAGRAPH = ("The city library opened in 1902 with a gift of four thousand books. Over the next century it grew "
             "into a network of twelve branches, added a music collection, a map room and a children's wing, and "
             "survived two floods and a fire. Today it lends more than a million items a year. ")
QUESTIONS = [
    "What is the capital of France?", "Write a short poem about the sea.", "Name three planets.",
    "Explain photosynthesis in one sentence.", f"Summarize this text: {PARAGRAPH}", "What is 12 times 7?",
    "Give me a tip for learning to code.", f"List the facts in this text: {PARAGRAPH * 2}",
    "Who wrote Romeo and Juliet?", "Describe a cat.", f"What happened to the library? {PARAGRAPH}",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", f"Rewrite more simply: {PARAGRAPH * 3}",
    "Tell me a joke.", "How do airplanes fly?",
]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-1-prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    common = dict(threads=torch.get_num_threads(), max_new_tokens=a.new_tokens, dtype="float32",
                  **run_fields(f"cpu {platform.machine()}"))

    model_dir = default_model_dir()
    llm = LLM(str(model_dir), max_model_len=2048)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id

    def ours(batch, fixed):
        params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=fixed)
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.token_ids) for o in outs)

    @torch.inference_mode()
    def theirs(batch, fixed):
        width = max(map(len, batch))
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=eos,
                          min_new_tokens=a.new_tokens if fixed else 0)
        secs = time.perf_counter() - t
        new = out[:, width:].tolist()
        return secs, sum(len(row) if fixed or eos not in row else row.index(eos) + 1 for row in new)

    ours(prompts[:2], True), theirs(prompts[:2], True)  # warm-up
    for mode in ("fixed", "natural"):
        fixed = mode == "fixed"
        for batch_size, groups in ((1, [[p] for p in prompts[: a.batch_1_prompts]]), (len(prompts), [prompts])):
            best: dict[str, tuple[float, int]] = {}
            for _ in range(a.rounds):  # alternate so that machine noise hits both engines alike
                for name, fn in (("asyncllm", ours), ("transformers", theirs)):
                    secs, toks = map(sum, zip(*(fn(g, fixed) for g in groups)))
                    if name not in best or secs < best[name][0]:
                        best[name] = (secs, toks)
            rate = {}
            for name, (secs, toks) in best.items():
                rate[name] = toks / secs
                emit(bench="cpu_e2e", mode=mode, engine=name, batch=batch_size, output_tokens=toks,
                     seconds=round(secs, 3), tok_per_s=round(toks / secs, 1), best_of=a.rounds, **common)
            emit(bench="cpu_e2e", mode=mode, metric="asyncllm_over_transformers", batch=batch_size,
                 ratio=round(rate["asyncllm"] / rate["transformers"], 2), **common)


if __name__ == "__main__":
    main()
