"""Rotary position embedding from a precomputed cos/sin cache indexed by position.

The cache is float32 [max_position, rotary_dim]: cos in the first half, sin in the second (flashinfer's layout).
Frequencies come from transformers' own rope functions, so every rope type it defines that does not depend on the
sequence length (default, linear, llama3, yarn, ...) matches it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_DYNAMIC_TYPES = {"dynamic", "longrope"}


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def compute_inv_freq(hf_config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], attention scaling) as transformers computes them."""
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if rope_type in _DYNAMIC_TYPES:
        raise ValueError(f"rope type {rope_type!r} depends on the sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """The cos/sin cache of one attention layer. The attention backend applies it to q and k (`apply_rotary` in
    the torch backend; on the GPU fused with the KV store, asyncllm_kernels.rope_store_kv)."""

    def __init__(self, hf_config: Any, head_dim: int, max_position: int) -> None:
        super().__init__()
        target = torch.empty(0).device  # the device the model is being built on (ambient torch.device context)
        with torch.device("cpu"):  # transformers' rope functions work on the CPU; so does this cache
            inv_freq, scaling = compute_inv_freq(hf_config, head_dim)
            freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cache = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)
        self.rotary_dim = 2 * inv_freq.numel()
        if self.rotary_dim != head_dim:
            raise ValueError("partial rotary embeddings are not supported")
        self.register_buffer("cos_sin_cache", cache.to(target), persistent=False)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D], positions [T] -> rotated (q, k), non-neox halves layout (HF rotate_half)."""
    cos, sin = cos_sin_cache[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
