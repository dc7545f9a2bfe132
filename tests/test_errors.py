"""Clear errors for what can never work: unknown models, impossible sizes, bad prompts."""
from __future__ import annotations

import json

import pytest

from asyncllm import LLM, EngineConfig, InvalidRequestError, ModelNotFoundError, OutOfMemoryError, SamplingParams


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local Hugging Face directory"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture(tmp_path, tiny_models):
    cfg = json.loads((tiny_models["qwen3"] / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError, match="supported: LlamaForCausalLM"):
        LLM(str(tmp_path), load_format="dummy")


def test_cache_too_small_for_one_request(tiny_models):
    with pytest.raises(OutOfMemoryError, match="less than one request of max_model_len=256"):
        LLM(str(tiny_models["qwen3"]), max_model_len=256, num_kv_blocks=4, block_size=16)


def test_bad_config_values():
    with pytest.raises(InvalidRequestError):
        EngineConfig(block_size=12)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(TypeError, match="unknown engine option"):
        EngineConfig.from_kwargs(None, max_num_seq=3)


def test_request_errors_leave_engine_usable(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), max_model_len=64)
    with pytest.raises(InvalidRequestError, match="maximum context length is 64"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[5, 10**9]], use_tqdm=False)
    for bad in ([5, -1], [5, 2**70], [5, 1.5], [5, "6"], [5, None], [[5]]):
        with pytest.raises(InvalidRequestError, match="token ids"):
            llm.engine.make_request(bad, SamplingParams())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate([[5, 6]], {"max_tokens": 3}, use_tqdm=False)  # type: ignore[arg-type]
    for bad in (None, 5, {"role": "user", "content": "hi"}, [None], [1.5], [[1, 2], None], [b"x"]):
        with pytest.raises(InvalidRequestError, match="prompt"):  # a clear error, not a TypeError from inside
            llm.generate(bad, use_tqdm=False)  # type: ignore[arg-type]
    # a batch with one bad prompt queues nothing
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6], [5] * 70], use_tqdm=False)
    assert not llm.engine.has_unfinished
    [out] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out.token_ids) == 4


def test_dummy_weights_need_no_checkpoint(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=64)
    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out.token_ids) == 5


def test_attention_backend_choice_on_cpu(tiny_models):
    """The registry: auto is torch off CUDA; GPU backends asked for by name on the CPU, or an unknown name, are a
    clear error naming the option."""
    import torch

    from asyncllm.layers.attention import Attention, TorchAttentionBackend
    from asyncllm.layers.attention_backends import BACKENDS, auto_backend, fast_path, make_backend

    attn, cpu = Attention(4, 2, 16, 0.25), torch.device("cpu")
    assert isinstance(make_backend("auto", cpu, torch.float32, attn, 16), TorchAttentionBackend)
    assert auto_backend(cpu, torch.bfloat16) == "torch" and not fast_path("auto", cpu)
    assert auto_backend(torch.device("cuda"), torch.float32) in ("triton", "torch")  # flashinfer needs bf16/fp16
    assert not fast_path("torch", torch.device("cuda"))
    for name in ("triton", "flashinfer"):
        assert name in BACKENDS
        with pytest.raises(InvalidRequestError, match=f"the {name} attention backend needs a CUDA device") as e:
            make_backend(name, cpu, torch.bfloat16, attn, 16)
        assert e.value.param == "attention_backend"
    with pytest.raises(InvalidRequestError, match="unknown attention backend 'xformers' \\(available: auto, torch"):
        make_backend("xformers", cpu, torch.float32, attn, 16)
    with pytest.raises(InvalidRequestError, match="triton attention backend needs a CUDA device"):
        LLM(str(tiny_models["llama"]), max_model_len=64, attention_backend="triton")
