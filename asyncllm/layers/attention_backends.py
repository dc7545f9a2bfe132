"""Attention backend choice: a registry of the backends by name, and `auto`'s order among them.

Every backend implements `AttentionBackend` (plan, forward); the GPU ones (triton, flashinfer) also
`GraphAttentionBackend`'s CUDA-graph hooks: `plan_capture(meta)` once per captured decode graph, `attend` between
the pieces of a piecewise graph. A replay runs no hook: a step changes only the contents of the graph's buffers.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable

import torch

from asyncllm.errors import InvalidRequestError
from asyncllm.layers.attention import Attention, AttentionBackend, TorchAttentionBackend, TritonAttentionBackend

log = logging.getLogger(__name__)


def _torch(device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    return TorchAttentionBackend()


def _triton(device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    if device.type != "cuda":
        raise InvalidRequestError("the triton attention backend needs a CUDA device", "attention_backend")
    return TritonAttentionBackend()


def _flashinfer(device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    if device.type != "cuda":
        raise InvalidRequestError("the flashinfer attention backend needs a CUDA device", "attention_backend")
    if dtype == torch.float32:
        raise InvalidRequestError("the flashinfer backend needs bfloat16 or float16", "attention_backend")
    if not importlib.util.find_spec("flashinfer"):
        raise InvalidRequestError("flashinfer is not installed (pip install asyncllm[gpu])", "attention_backend")
    from asyncllm.layers.flashinfer_attention import FlashInferAttentionBackend, self_test

    backend = FlashInferAttentionBackend(device, dtype, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
    self_test(backend, block_size)
    return backend


# name -> factory(device, dtype, one attention layer (heads, head_dim, scale), KV block size)
BACKENDS: dict[str, Callable[[torch.device, torch.dtype, Attention, int], AttentionBackend]] = {
    "torch": _torch, "triton": _triton, "flashinfer": _flashinfer,
}


def auto_backend(device: torch.device, dtype: torch.dtype, flashinfer: bool = True) -> str:
    """`auto`'s choice: flashinfer on CUDA in bf16/fp16 when it is installed (and `flashinfer`), else triton on CUDA,
    else torch."""
    if device.type != "cuda":
        return "torch"
    if flashinfer and dtype != torch.float32 and importlib.util.find_spec("flashinfer"):
        return "flashinfer"
    return "triton" if importlib.util.find_spec("triton") else "torch"


def fast_path(name: str, device: torch.device) -> bool:
    """make_backend(name, device, ...) will not be the torch backend: CUDA, Triton importable, not asked for torch."""
    return device.type == "cuda" and name != "torch" and importlib.util.find_spec("triton") is not None


def make_backend(name: str, device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    """The backend `name` (one of BACKENDS, or auto). auto falls back from flashinfer to triton when flashinfer's
    kernels fail to load or its start-up self-test fails."""
    if name == "auto":
        name = auto_backend(device, dtype)
        if name == "flashinfer":
            try:
                return _flashinfer(device, dtype, attn, block_size)
            except Exception as e:  # a kernel variant missing from this flashinfer build
                log.warning("flashinfer attention unavailable (%s: %s); using the triton backend", type(e).__name__, e)
                name = auto_backend(device, dtype, flashinfer=False)
    if name not in BACKENDS:
        raise InvalidRequestError(
            f"unknown attention backend {name!r} (available: auto, {', '.join(BACKENDS)})", "attention_backend")
    return BACKENDS[name](device, dtype, attn, block_size)
