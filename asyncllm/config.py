"""Engine configuration. Field names follow vLLM / nano-vllm where they overlap."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Literal

from asyncllm.errors import InvalidRequestError

# KV cache budget on CPU when neither num_kv_blocks nor kv_cache_memory_bytes is given (bytes).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    model: str | None = None  # local HF directory; None = the bundled SmolLM2-135M-Instruct
    tokenizer: str | None = None  # defaults to `model`
    served_model_name: str | None = None  # the name clients send and metrics carry; default: the directory's name
    # auto: the sampling parameters the model's generation_config.json sets are the server's defaults; none: not
    generation_config: Literal["auto", "none"] = "auto"
    max_num_seqs: int = 256  # most requests in one step
    max_model_len: int | None = None  # prompt + output tokens; default: the model's context length
    max_num_batched_tokens: int | None = None  # token budget per step; default by model size (runner.max_step_tokens)
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine may use in total
    num_kv_blocks: int | None = None  # exact KV cache size; overrides the memory budgets
    kv_cache_memory_bytes: int | None = None  # KV cache budget in bytes (CPU default 1 GiB)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto = float32 on CPU, the model's dtype on CUDA
    device: Literal["auto", "cuda", "cpu"] = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    seed: int = 0
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    cuda_graph_max_bs: int | None = None  # largest decode batch replayed from a CUDA graph; default min(256, max_num_seqs)
    tensor_parallel_size: int = 1  # > 1 needs torchrun with as many processes (1 = whatever torchrun started)
    # TP on CUDA: symm_mem = small all-reduces by one-shot kernels over symmetric memory (the one before each RMSNorm
    # fused with it), larger ones NCCL; auto = symm_mem where it can be set up, else NCCL
    all_reduce: Literal["auto", "nccl", "symm_mem"] = "auto"
    attention_backend: Literal["auto", "torch", "flashinfer", "triton"] = "auto"
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prompt prefixes (radix tree)
    overlap_schedule: bool | None = None  # schedule step N+1 while step N runs; None = on with CUDA, off on CPU
    stream_interval: int = 1  # AsyncEngine.stream: tokens per chunk (the first token and the last chunk go at once)
    # While requests decode, hold new prompts back for up to this many steps until they fill half a step's token
    # budget: a step that prefills runs without a CUDA graph, so fewer, fuller ones cost the running requests less.
    # 0 = admit at once (the default until its effect on serving is measured on its own).
    max_prefill_delay_steps: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}", "block_size")
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be at least 1", "max_num_seqs")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError("gpu_memory_utilization must be in (0, 1]", "gpu_memory_utilization")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise InvalidRequestError("max_num_batched_tokens must be at least 1", "max_num_batched_tokens")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise InvalidRequestError("stream_interval must be a positive integer", "stream_interval")
        if not isinstance(self.max_prefill_delay_steps, int) or self.max_prefill_delay_steps < 0:
            raise InvalidRequestError("max_prefill_delay_steps must be a non-negative integer", "max_prefill_delay_steps")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}", name)
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError("tensor_parallel_size must be at least 1", "tensor_parallel_size")

    @property
    def model_name(self) -> str:
        from asyncllm.model_files import DEFAULT_MODEL_NAME

        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model)) if self.model else DEFAULT_MODEL_NAME

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: Any) -> "EngineConfig":
        # names used by other engines for the same switch
        if "enable_radix_cache" in kwargs:
            kwargs["enable_prefix_caching"] = bool(kwargs.pop("enable_radix_cache"))
        if "cache_type" in kwargs:
            cache_type = kwargs.pop("cache_type")
            if cache_type not in ("radix", "naive"):
                raise InvalidRequestError(f"cache_type must be 'radix' or 'naive', got {cache_type!r}", "cache_type")
            kwargs["enable_prefix_caching"] = cache_type == "radix"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)
