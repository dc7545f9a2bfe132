"""Model registry: HF architecture name -> how to build it."""
from __future__ import annotations

from typing import Any

from asyncllm.errors import ModelNotFoundError
from asyncllm.models.llama import CausalLM, DecoderSpec

ARCHITECTURES: dict[str, DecoderSpec] = {
    "LlamaForCausalLM": DecoderSpec(),
    "MistralForCausalLM": DecoderSpec(),
    "Qwen2ForCausalLM": DecoderSpec(qkv_bias=True),
    "Qwen3ForCausalLM": DecoderSpec(qk_norm=True),
}


def build_model(hf_config: Any, max_position: int) -> CausalLM:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in ARCHITECTURES:
            if getattr(hf_config, "use_sliding_window", False) and getattr(hf_config, "sliding_window", None):
                raise ModelNotFoundError(f"{arch} with sliding-window attention is not supported")
            return CausalLM(hf_config, ARCHITECTURES[arch], max_position)
    raise ModelNotFoundError(
        f"unsupported architecture {archs or hf_config.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
    )


__all__ = ["ARCHITECTURES", "CausalLM", "build_model"]
