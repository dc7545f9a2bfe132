"""Engine configuration. Field names follow vLLM / nano-vllm where they overlap."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from asyncllm.errors import InvalidRequestError

# KV cache budget on CPU when neither num_kv_blocks nor kv_cache_memory_bytes is given (bytes).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def option(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
           flags: tuple[str, ...] = ()) -> Any:
    """An EngineConfig field and its command-line flag (`--name-with-dashes`, plus `flags`): the help text, and
    the range [lo, hi] numbers must be in. serve.py builds the CLI from these."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "flags": flags})


@dataclass
class EngineConfig:
    model: str | None = option(None, "local HF directory; None = the bundled SmolLM2-135M-Instruct")
    tokenizer: str | None = option(None, "tokenizer directory (default: the model's)")
    served_model_name: str | None = option(None, "the model name clients send and metrics carry (default: the "
                                                  "directory's name)")
    max_num_seqs: int = option(256, "most requests in one step", lo=1)
    max_model_len: int | None = option(None, "prompt + output tokens (default: the model's context length)", lo=1)
    max_num_batched_tokens: int | None = option(
        None, "token budget per step (chunked prefill); default by model size: 8192 up to 1B parameters per GPU, "
              "down to 2048 from 4B; 2048 on CPU", lo=1)
    # While requests decode, hold new prompts back for up to this many steps until they fill half a step's token
    # budget: a step that prefills costs more than a decode step, so fewer, fuller ones may cost the running requests
    # less.
    max_prefill_delay_steps: int = option(
        0, "steps new prompts may wait, while others decode, to prefill together (0: at once; measured slower on "
           "the H200 at 4, see docs/BENCHMARKS.md)", lo=0)
    # engine/step_costs.py, engine/scheduler.py; off by default: on the H200 it cost the Llama-8B shape throughput and
    # time to first token (docs/BENCHMARKS.md)
    max_step_slowdown: float = option(
        0.0, "while requests decode, a step that prefills takes at most this many times a decode step (prompt "
             "tokens limited by measured GPU step times, CUDA only; raised to drain a backlog of prompts in ~100 "
             "steps); 0 = no limit", lo=0)
    block_size: int = option(16, "tokens per KV cache block (a power of two)", lo=1)
    gpu_memory_utilization: float = option(0.9, "share of the GPU's memory the engine may use in total", lo=0.01, hi=1.0)
    num_kv_blocks: int | None = option(None, "exact KV cache size in blocks; overrides the memory budgets", lo=1)
    kv_cache_memory_bytes: int | None = option(None, "KV cache budget in bytes (CPU default 1 GiB)", lo=1)
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the model's on CUDA)")
    device: Literal["auto", "cuda", "cpu"] = option("auto", "where the model runs")
    load_format: Literal["auto", "safetensors", "dummy"] = option("auto", "dummy = random weights from config.json")
    seed: int = option(0, "seed of the requests that bring none")
    enforce_eager: bool = option(False, "no CUDA graphs")
    cuda_graph_max_bs: int | None = option(
        None, "largest decode batch replayed from a CUDA graph (default: min(256, max-num-seqs))", lo=1)
    cuda_graph_max_tokens: int | None = option(
        None, "largest step with prompt tokens replayed from piecewise CUDA graphs (attention eager between "
              "layers); default: up to 2048 tokens, or more while tokens x parameters per GPU stay under 2^41; at "
              "most the step budget; none under tensor parallelism (not run on several GPUs yet); 0 = none", lo=0)
    tensor_parallel_size: int = option(
        1, "shards over torchrun's processes; must equal --nproc-per-node (1 = whatever torchrun started)", lo=1,
        flags=("--tp",))
    # TP on CUDA: symm_mem = small all-reduces by one-shot kernels over symmetric memory (the one before each RMSNorm
    # fused with it), larger ones NCCL; auto = symm_mem where it can be set up, else NCCL
    all_reduce: Literal["auto", "nccl", "symm_mem"] = option(
        "auto", "tensor parallelism on CUDA: symm_mem = small all-reduces by one-shot symmetric-memory kernels (fused "
                "with the next RMSNorm), auto = symm_mem where it can be set up, else NCCL")
    step_transport: Literal["auto", "shm", "broadcast"] = option(
        "auto", "tensor parallelism: how each step reaches the followers: shm = a shared-memory ring (one host), "
                "broadcast = torch.distributed broadcasts (NCCL on CUDA, gloo on CPU; across hosts), auto = shm when "
                "every rank is on rank 0's x86-64 host")
    attention_backend: Literal["auto", "torch", "flashinfer", "triton"] = option("auto", "attention implementation")
    small_matmul: Literal["triton", "cublas"] = option(
        "triton", "CUDA: matmuls of steps of up to 16 tokens (decode of small batches) in layers of up to 2048 output "
                  "features: triton = asyncllm_kernels.skinny_linear (SwiGLU fused), cublas = torch's")
    dependent_launch: bool = option(
        True, "CUDA, Hopper and later: the Triton kernels launched with programmatic dependent launch (each may start "
              "while the previous kernel finishes; weights read early)")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of shared prompt prefixes (radix tree)",
                                         flags=("--enable-radix-cache",))
    overlap_schedule: bool | None = option(
        None, "schedule step N+1 while the GPU runs step N (default: on with CUDA, off on CPU)")
    stream_interval: int = option(
        1, "tokens per streamed chunk (fewer writes per step at many streams; the first token and the last chunk "
           "are sent at once)", lo=1)
    generation_config: Literal["auto", "none"] = option(
        "auto", "auto: sampling parameters the model's generation_config.json sets (temperature, top_p, top_k, "
                "min_p, repetition_penalty) are the defaults of requests that leave them out; none: ignore it")

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
        if not isinstance(self.max_step_slowdown, (int, float)) or not (
                self.max_step_slowdown == 0 or self.max_step_slowdown >= 1):
            raise InvalidRequestError("max_step_slowdown must be 0 (no limit) or at least 1", "max_step_slowdown")
        for name, lo in (("max_model_len", 1), ("num_kv_blocks", 1), ("kv_cache_memory_bytes", 1),
                         ("cuda_graph_max_bs", 1), ("cuda_graph_max_tokens", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < lo):
                kind = "a positive" if lo else "a non-negative"
                raise InvalidRequestError(f"{name} must be {kind} integer, got {value!r}", name)
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
