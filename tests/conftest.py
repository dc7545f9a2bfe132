"""Shared fixtures: the real SmolLM2 directory, tiny random HF models, and a transformers reference."""
from __future__ import annotations

import os
import re
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asyncllm.model_files import default_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return default_model_dir()


def make_tiny_model(path: Path, arch: str, tokenizer_from: Path | None = None, seed: int = 0,
                    dtype_name: str = "float32", **overrides) -> Path:
    """Save a small random model of `arch` ("llama", "qwen2", "qwen3") as a HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=49152 if tokenizer_from else 512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=arch != "llama",
        initializer_range=0.1,  # peaked logits: few near-ties between greedy candidates
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(getattr(torch, dtype_name))
    model.save_pretrained(path)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, path / name)
    return path


TOKENIZER_IDS = dict(bos_token_id=0, eos_token_id=0)  # make_tiny_model's ids to match make_byte_level_tokenizer


def make_byte_level_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A small byte-level BPE tokenizer (EOS "<|endoftext|>" = id 0), trained here: for models without the
    SmolLM2 files (GPU machines) that still need text (structured outputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    corpus = ['{"n": 12, "tag": "a"}', "left right up down 123-ab 0123456789", "the quick brown fox jumps"] * 20
    tok.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch, tokenizer_from=smollm2_dir) for arch in ("llama", "qwen2", "qwen3")}


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32, device="cpu") -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding), EOS included if hit."""
    return [tokens for tokens, _ in hf_greedy_with_logits(model_dir, prompts, max_new_tokens, dtype, device)]


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lens]


def our_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """Our model's logits [T, V] at every position of `token_ids`, computed as one prefill through the engine's
    runner and paged KV cache (blocks borrowed from the block manager and given back)."""
    from asyncllm.engine.request import Request
    from asyncllm.engine.scheduler import Batch
    from asyncllm.sampling_params import SamplingParams

    engine = llm.engine
    runner = engine.runner
    req = Request("logits", list(token_ids), SamplingParams(temperature=0.0), 1, frozenset())
    req.block_table = engine.blocks.allocate(engine.blocks.blocks_for(len(token_ids)))
    req.row = 0  # the engine is idle: its row 0 is free (a later request there resends its whole table)
    try:
        batch = Batch()
        batch.add(req, len(token_ids))
        with torch.inference_mode():
            inputs = runner.prepare(batch)
            runner.backend.plan(inputs.meta)
            hidden = runner.model(inputs.input_ids, inputs.positions)
            return runner.model.compute_logits(hidden).float().cpu()
    finally:
        engine.blocks.free(req.block_table)


def hf_logits(model_dir: Path, token_ids: list[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.inference_mode():
        return model(torch.tensor([token_ids], device=device)).logits[0].float().cpu()


def hf_greedy_with_logits(model_dir: Path, prompts, max_new_tokens: int, dtype, device):
    """transformers' greedy tokens (one prompt at a time, no padding, EOS included if hit) and the logits it
    chose them from, per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=model.generation_config.eos_token_id)
            results.append((out.sequences[0, len(ids):].tolist(), [s[0].float().cpu() for s in out.logits]))
    return results


def assert_same_until_near_tie(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor], tie: float) -> int:
    """Tokens must agree until the reference's top-2 logit gap is below `tie`; returns the matched length."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = ref_logits[i].topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < tie, f"diverged at step {i} ({a} vs {b}) where the reference's top-2 gap is {gap:.4f} >= {tie}"
            return i
    assert len(ours) == len(ref), f"lengths differ: {len(ours)} vs {len(ref)}"
    return len(ours)


@pytest.fixture(autouse=True)
def _free_gpu_memory(request):
    """Each GPU test's engine goes away before the next test sizes its KV cache."""
    yield
    if request.node.get_closest_marker("gpu") and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# ---- servers in a subprocess ----------------------------------------------------------------------------------------
def start_server(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    """Run a server command; returns (process, its URL, its output so far) once it says it is ready."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if m := re.search(r"ready on (http://\S+)", line):
            return proc, m.group(1), lines
    raise AssertionError("server did not start:\n" + "".join(lines[-40:]))


def start_tp_server(model: Path, nproc: int, device: str, env: dict[str, str], *extra: str
                    ) -> tuple[subprocess.Popen, str, list[str]]:
    """`torchrun --nproc-per-node nproc -m asyncllm.serve` on a free port; returns once rank 0 says it is ready."""
    return start_server([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                         "-m", "asyncllm.serve", "--model", str(model), "--device", device, "--tp", str(nproc),
                         "--port", "0", "--max-model-len", "128", *extra], env)


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous the test starts next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_tp_server(proc: subprocess.Popen) -> None:
    """After a failed test: SIGTERM lets torchrun stop its workers (they free their GPUs); SIGKILL to the session
    if it has not exited within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def leader_pid(lines: list[str]) -> int:
    return int(next(m.group(1) for line in lines if (m := re.search(r"serving .* \(pid (\d+),", line))))


def follower_pid(proc: subprocess.Popen, lines: list[str], rank: int = 1) -> int:
    """A follower's pid from its log line (which may come just after rank 0's 'ready')."""
    pattern = re.compile(rf"rank {rank} \(pid (\d+)\): following rank 0")
    for line in lines:
        if m := pattern.search(line):
            return int(m.group(1))
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if m := pattern.search(line):
            return int(m.group(1))
    raise AssertionError("no follower line in:\n" + "".join(lines[-40:]))
