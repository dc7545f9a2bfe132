"""Workload 6 of BENCHMARKS.md: SmolLM2-135M on CPU, asyncllm `LLM.generate` vs transformers `generate`.

Same prompts, greedy, N new tokens each (EOS ignored on both sides), measured in one run. One JSON line per result.
    python tools/bench_cpu.py [--new-tokens 64] [--prompts 16] [--batch-1-prompts 4]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM

from asyncllm import LLM, SamplingParams
from asyncllm.model_files import default_model_dir

TOPICS = ["the sea", "a city at night", "coffee", "mountains", "a robot", "winter", "friendship", "the moon",
          "a library", "rain", "a train journey", "music", "a garden", "the desert", "a lighthouse", "time"]


def emit(**fields):
    print(json.dumps(fields), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-1-prompts", type=int, default=4)
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = dict(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(), commit=commit,
                  date=time.strftime("%Y-%m-%d"), new_tokens=a.new_tokens)

    model_dir = default_model_dir()
    llm = LLM(str(model_dir), max_model_len=1024)
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Write a short poem about {t}."}])
               for t in (TOPICS * 4)[: a.prompts]]
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = hf.generation_config.eos_token_id

    def ours(batch):
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.token_ids) for o in outs)

    @torch.inference_mode()
    def theirs(batch):
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                          do_sample=False, pad_token_id=pad)
        return time.perf_counter() - t, (out.shape[1] - width) * len(batch)

    ours(prompts[:2]), theirs(prompts[:2])  # warm-up
    for batch_size, groups in ((1, [[p] for p in prompts[: a.batch_1_prompts]]), (a.prompts, [prompts])):
        results = {}
        for name, fn in (("asyncllm", ours), ("transformers", theirs)):
            secs, toks = map(sum, zip(*(fn(g) for g in groups)))
            results[name] = toks / secs
            emit(bench="cpu_e2e", engine=name, batch=batch_size, tokens=toks, seconds=round(secs, 3),
                 tok_per_s=round(toks / secs, 1), **common)
        emit(bench="cpu_e2e", metric="speedup_vs_transformers", batch=batch_size,
             ratio=round(results["asyncllm"] / results["transformers"], 2), **common)


if __name__ == "__main__":
    main()
