"""Run by torchrun from the tensor-parallel tests: tokens (greedy by default) through `LLM` on every rank's shard;
rank 0 writes them as JSON. The documented pattern: followers get their LLM back only once rank 0 has shut down.
    torchrun --nproc-per-node N tests/tp_generate.py MODEL OUT.json PROMPTS_JSON [device dtype max_tokens [CONFIG_JSON
    [PARAMS_JSON]]]
CONFIG_JSON overrides engine options, PARAMS_JSON sampling parameters (default greedy, ignore_eos). Rank 0 writes
{"tokens": [...], "preemptions": n}. A rank still running after TP_GENERATE_DUMP_S seconds (default 300) prints
every thread's stack and exits."""
import faulthandler
import json
import logging
import os
import sys

from asyncllm import LLM, SamplingParams

faulthandler.dump_traceback_later(float(os.environ.get("TP_GENERATE_DUMP_S", "300")), exit=True)
logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(asctime)s %(name)s: %(message)s")
model, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
device, dtype, max_tokens, config, params = (sys.argv[4:9] + ["cpu", "auto", "12", "{}", "{}"][len(sys.argv[4:9]):])
llm = LLM(model, **{"device": device, "dtype": dtype, "max_model_len": 512, "num_kv_blocks": 512, **json.loads(config)})
if not llm.is_follower:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": int(max_tokens), "ignore_eos": True,
                                 **json.loads(params)})
    outs = llm.generate(prompts, sampling, use_tqdm=False)
    with open(out, "w") as f:
        json.dump({"tokens": [o.token_ids for o in outs],
                   "preemptions": llm.engine.scheduler.stats.num_preemptions}, f)
    llm.shutdown()
logging.info("done")
