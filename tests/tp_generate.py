"""Run by torchrun from test_tensor_parallel.py: greedy tokens through `LLM` on every rank's shard; rank 0 writes
them as JSON to argv[2]. The documented pattern: followers get their LLM back only once rank 0 has shut down."""
import json
import sys

from asyncllm import LLM, SamplingParams

model, out = sys.argv[1], sys.argv[2]
prompts = json.loads(sys.argv[3])
llm = LLM(model, device="cpu", max_model_len=128, tensor_parallel_size=2)
if not llm.is_follower:
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    with open(out, "w") as f:
        json.dump([o.token_ids for o in outs], f)
    llm.shutdown()
