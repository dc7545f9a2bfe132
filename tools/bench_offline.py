"""Workload 1 of BENCHMARKS.md (nano-vllm's benchmark): offline throughput on the GPU.

random.seed(0); 256 requests; prompts of random token ids in [0, 10000) with length uniform in [100, 1024];
max_tokens uniform in [100, 1024]; ignore_eos; temperature 0.6; dummy weights of the given shape; throughput =
output tokens / wall time of `generate`, after one warm-up. Variants in the same run (--variants,
BACKEND[-eager][-no-pieces][-no-overlap][-nccl|-symm][-cublas]): CUDA graphs off, piecewise graphs off, overlap scheduling off, NCCL-only or symmetric-memory all-reduces, other attention backends; each line also
gives the host vs GPU time per step. Baseline in the same run: transformers `generate` (eager, bf16, same shape, random weights)
on a subset — the first --hf-requests requests, max_tokens capped at --hf-max-tokens, left-padded in one batch —
and our engine on that same subset. One JSON line per result.
    python tools/bench_offline.py --model tools/model_configs/qwen3-0.6b
    torchrun --standalone --nproc-per-node 4 tools/bench_offline.py --model ... --variants flashinfer --no-hf
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time

import torch
from bench_common import StepTimer, run_fields, variant_config

from asyncllm import LLM, SamplingParams



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=32)
    ap.add_argument("--hf-max-tokens", type=int, default=128)
    # nano-vllm's engine limits for this benchmark (its Config defaults)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=["flashinfer", "flashinfer-no-overlap", "flashinfer-eager", "triton"])
    ap.add_argument("--floor-s", type=float, default=5.5,
                    help="the workload's memory-bound floor: 5.5 s for qwen3-0.6b on one H100 (BENCHMARKS.md); 0 = none")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    a = ap.parse_args()
    common = dict(model=os.path.basename(a.model.rstrip("/")), tp=int(os.environ.get("WORLD_SIZE", "1")), **run_fields())
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(a.num_requests)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024))
              for _ in range(a.num_requests)]
    sub_prompts = prompts[: a.hf_requests]
    sub_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=a.hf_max_tokens) for _ in sub_prompts]

    def emit(**f):
        print(json.dumps({**f, **common}), flush=True)

    for variant in a.variants:
        llm = LLM(a.model, load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=a.max_num_seqs,
                  max_num_batched_tokens=a.max_num_batched_tokens, **variant_config(variant))
        if llm.is_follower:  # under torchrun: rank 0 has finished this variant
            continue
        llm.generate(["warm up"] if llm.tokenizer else [[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
        timer = StepTimer(llm.engine)
        for bench, ps, pp in (("offline_throughput", prompts, params), ("offline_subset", sub_prompts, sub_params)):
            timer.reset()
            t = time.perf_counter()
            toks = sum(len(o.token_ids) for o in llm.generate(ps, pp, use_tqdm=False))
            secs = time.perf_counter() - t
            extra = {"floor_fraction": round(a.floor_s / secs, 3)} if bench == "offline_throughput" and a.floor_s else {}
            emit(bench=bench, engine=f"asyncllm-{variant}", requests=len(ps), output_tokens=toks,
                 seconds=round(secs, 2), output_tok_per_s=round(toks / secs, 1), **extra, **timer.summary(secs))
        llm.shutdown()  # tensor parallelism: release the followers
        del llm, timer
        gc.collect()  # the timer's wrappers form a reference cycle with the runner
        torch.cuda.empty_cache()

    if a.no_hf or int(os.environ.get("RANK", "0")):
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(a.model)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    width = max(map(len, sub_prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in sub_prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in sub_prompts], device="cuda")
    with torch.inference_mode():
        hf.generate(ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=True, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.hf_max_tokens, min_new_tokens=a.hf_max_tokens,
                          do_sample=True, temperature=0.6, top_k=0, top_p=1.0, pad_token_id=0)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
    toks = (out.shape[1] - width) * len(sub_prompts)
    emit(bench="offline_subset", engine="transformers", requests=len(sub_prompts), output_tokens=toks,
         seconds=round(secs, 2), output_tok_per_s=round(toks / secs, 1))


if __name__ == "__main__":
    main()
