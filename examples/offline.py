"""Offline batch generation with the bundled SmolLM2-135M-Instruct (converted on first run).

    python examples/offline.py [--model DIR] [--max-tokens N]
"""
import argparse

from asyncllm import LLM, SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="local HF model directory (default: bundled SmolLM2)")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()

llm = LLM(args.model, max_model_len=2048)
questions = ["What is the capital of France?", "Write a haiku about autumn.", "Name three planets."]
outputs = llm.chat(
    [[{"role": "user", "content": q}] for q in questions],
    SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
)
for q, out in zip(questions, outputs):
    print(f"### {q}\n{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]\n")
