"""Decoder-only transformer of the Llama family: Llama and Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k norm).

Input is one step's packed tokens [T]; output is hidden states [T, H]. q|k|v and gate|up are fused matmuls.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asyncllm import distributed
from asyncllm.errors import InvalidRequestError, ModelLoadError
from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.attention import Attention, Rotary
from asyncllm.layers.linear import (
    MergedLinear,
    RowParallelLinear,
    ShardId,
    VocabParallelEmbedding,
    default_weight_loader,
)
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class DecoderSpec:
    """What differs between the supported architectures."""

    qkv_bias: bool = False
    qk_norm: bool = False


class DecoderAttention(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, max_position: int) -> None:
        super().__init__()
        tp = distributed.current()
        total_heads = cfg.num_attention_heads
        total_kv = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // total_heads
        # TP: query heads split evenly; KV heads split too, or replicated when there are fewer than ranks
        lo, hi = distributed.shard_range(total_heads, tp.rank, tp.size, "attention heads")
        self.num_heads = hi - lo
        if total_kv >= tp.size:
            lo, hi = distributed.shard_range(total_kv, tp.rank, tp.size, "KV heads")
            self.num_kv_heads, kv_index = hi - lo, tp.rank
        elif tp.size % total_kv:
            raise InvalidRequestError(f"the tensor-parallel size ({tp.size}) must be a multiple of the number of KV "
                                      f"heads ({total_kv}) when it exceeds it", "tensor_parallel_size")
        else:
            self.num_kv_heads, kv_index = 1, tp.rank * total_kv // tp.size
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = spec.qkv_bias or bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": (q_size, tp.rank), "k": (kv_size, kv_index),
                                                       "v": (kv_size, kv_index)}, bias=bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size,
                                        bias=bool(getattr(cfg, "attention_bias", False)))
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if spec.qk_norm else None
        self.rotary = RotaryEmbedding(cfg, self.head_dim, max_position)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)
        self.splits = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x normed -> this rank's partial sum of o_proj (see RowParallelLinear)."""
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.splits, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        rotary = Rotary(positions, self.rotary.cos_sin_cache)
        if self.q_norm is not None and self.k_norm is not None:
            if self.q_norm.fused:  # the backend normalizes q and k in its rotary + KV-store kernel
                rotary = rotary._replace(q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps)
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, rotary=rotary)  # the backend rotates q and k
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))


class DecoderMLP(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"activation {act!r} is not supported (only silu)")
        bias = bool(getattr(cfg, "mlp_bias", False))
        tp = distributed.current()
        lo, hi = distributed.shard_range(cfg.intermediate_size, tp.rank, tp.size, "intermediate size")
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {0: (hi - lo, tp.rank), 1: (hi - lo, tp.rank)}, bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x normed -> this rank's partial sum of down_proj (see RowParallelLinear)."""
        h = self.gate_up_proj.swiglu(x)  # fused where the few-row kernel takes x
        if h is None:
            h = self.act(self.gate_up_proj(x))
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, max_position: int) -> None:
        super().__init__()
        # the norms that all-reduce run in the order ..., post-attention (slot 1), next layer's input (0), ...,
        # the model's last (0): consecutive ones alternate exchange slots
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, exchange_slot=0)
        self.self_attn = DecoderAttention(cfg, spec, max_position)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, exchange_slot=1)
        self.mlp = DecoderMLP(cfg)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the embeddings (residual None), else the previous layer's partial sums; returns this layer's."""
        x, residual = self.input_layernorm.add_norm(x, residual)
        x, residual = self.post_attention_layernorm.add_norm(self.self_attn(positions, x), residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, spec: DecoderSpec, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, max_position) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, exchange_slot=0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x, _ = self.norm(x, residual, reduce=True)
        return x


class CausalLM(nn.Module):
    """The model the runner drives: `forward` -> hidden states, `compute_logits` on the rows that sample."""

    # checkpoint name fragment -> (fused parameter fragment, shard id)
    stacked_params = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, cfg: Any, spec: DecoderSpec, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, spec, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [T, vocab] in the model's dtype (into `out` when given)."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden, out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, set[ShardId]]:
        """Copy checkpoint tensors into the parameters (each through its `weight_loader`); returns, per parameter
        name, the parts loaded (None for a parameter without parts). A tensor loaded twice, or with no place in
        the model, raises ModelLoadError; `check_loaded` then says what is missing."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[ShardId]] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard = name, None
            for fragment, (fused, shard_id) in self.stacked_params.items():
                if fragment in name:
                    target, shard = name.replace(fragment, fused), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the model")
            parts = loaded.setdefault(target, set())
            if shard in parts:
                raise ModelLoadError(f"checkpoint tensor {name!r} is loaded twice")
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            parts.add(shard)
        return loaded

    def check_loaded(self, loaded: dict[str, set[ShardId]]) -> list[str]:
        """Parameters (or parts of merged ones) the checkpoint did not provide."""
        missing = []
        for name, param in self.named_parameters():
            for shard in getattr(param, "shard_ids", (None,)):
                if shard not in loaded.get(name, ()):
                    missing.append(name if shard is None else f"{name} (part {shard!r})")
        return missing
