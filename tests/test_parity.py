"""Greedy decoding must give exactly transformers' tokens in float32 on CPU."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from asyncllm import LLM, SamplingParams
from conftest import hf_greedy, random_prompts

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
    "Describe a cat to someone who has never seen one.",
]


def test_smollm2_chat_batch_matches_transformers(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_model_len=512)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    outs = llm.generate(prompts, params, use_tqdm=False)  # one batch
    expected = hf_greedy(smollm2_dir, prompts, 32)
    assert [o.token_ids for o in outs] == expected
    assert outs[0].text == "The capital of France is Paris."
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    assert any(o.finish_reason == "length" and len(o.token_ids) == 32 for o in outs)


def test_default_model_plain_text_prompt(smollm2_dir):
    llm = LLM(max_model_len=256)  # model=None is the bundled SmolLM2
    assert llm.engine.model_dir == smollm2_dir
    [out] = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    ids = llm.tokenizer.encode("The quick brown fox")
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_greedy(smollm2_dir, [ids], 40)[0]
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_tiny_random_models_match_transformers(tiny_models, arch):
    model_dir = tiny_models[arch]
    prompts = random_prompts(6, 49152, 1, 40, seed=1)
    llm = LLM(str(model_dir), max_model_len=256, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, 24)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),  # q/k/v/o and MLP biases
    ("llama", dict(head_dim=32, num_key_value_heads=1)),  # head_dim != hidden / heads; one KV head (MQA)
    ("mistral", dict(sliding_window=None)),
    ("qwen3", dict(tie_word_embeddings=False, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 128})),
], ids=["llama-biases", "llama-mqa-wide-heads", "mistral", "qwen3-untied-yarn"])
def test_other_model_shapes_match_transformers(tmp_path, arch, overrides):
    from conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path / arch, arch, vocab_size=512, **overrides)
    weights = load_file(model_dir / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    biases = [k for k in weights if k.endswith(".bias")]
    for k in biases:  # transformers initializes biases to zero: give them values a dropped bias would change
        weights[k] = torch.randn(weights[k].shape, generator=g) * 0.1
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert bool(biases) == ("attention_bias" in overrides)
    prompts = random_prompts(5, 512, 1, 60, seed=3)
    llm = LLM(str(model_dir), max_model_len=256, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, 20)


def test_sharded_checkpoint_without_tokenizer(tmp_path):
    from conftest import make_tiny_model
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / "src", "qwen3", seed=3)
    model = AutoModelForCausalLM.from_pretrained(src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    prompts = random_prompts(3, 512, 4, 12, seed=2)
    llm = LLM(str(sharded), max_model_len=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(src, prompts, 16)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_logits_match_transformers_teacher_forced(tiny_models):
    model_dir = tiny_models["qwen3"]
    from conftest import hf_logits, our_logits

    ids = random_prompts(1, 49152, 70, 70, seed=4)[0]
    llm = LLM(str(model_dir), max_model_len=128, block_size=16)
    ours, ref = our_logits(llm, ids), hf_logits(model_dir, ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


def test_llm_generate_honours_stop_strings(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_model_len=512)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [full] = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    [cut] = llm.chat(chat, SamplingParams(temperature=0.0, max_tokens=20, stop=["l of Fr"]), use_tqdm=False)
    assert full.text == "The capital of France is Paris."
    assert cut.text == "The capita" and cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
