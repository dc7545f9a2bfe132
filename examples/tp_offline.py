"""Offline generation split over GPUs with tensor parallelism. Run it with torchrun, one process per GPU:

    torchrun --standalone --nproc-per-node 2 examples/tp_offline.py --model /path/to/hf-model

Every rank builds the same `LLM`: rank 0 gets an engine that drives generation; on ranks 1..N-1 the constructor
turns the process into a follower that runs rank 0's steps on its shard and returns only when rank 0 calls
`llm.shutdown()` (or exits). Only rank 0 sees outputs. On CPU (`--device cpu`) the same runs over gloo.
"""
import argparse

from asyncllm import LLM, SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None, help="local HF directory (default: the bundled SmolLM2-135M-Instruct)")
ap.add_argument("--device", default="auto")
args = ap.parse_args()

llm = LLM(args.model, device=args.device)
if llm.is_follower:
    raise SystemExit(0)  # rank 0 has finished
outputs = llm.generate(["The capital of France is", "Write a haiku about the sea."],
                       SamplingParams(temperature=0.0, max_tokens=32))
for out in outputs:
    print(repr(out.text))
llm.shutdown()
