"""Rotary embedding: every static rope type of transformers, built on whatever device the model is built on."""
import pytest
import torch
from transformers import LlamaConfig

from asyncllm.layers.rotary import RotaryEmbedding

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_cache_matches_transformers_and_follows_the_device_context(scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=512,
                      rope_scaling=scaling)
    ours = RotaryEmbedding(cfg, 64, 512)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), torch.arange(512)[None])
    torch.testing.assert_close(ours.cos_sin_cache, torch.cat([cos[0, :, :32], sin[0, :, :32]], dim=-1))
    with torch.device("meta"):  # like building the model under torch.device("cuda")
        assert RotaryEmbedding(cfg, 64, 512).cos_sin_cache.device.type == "meta"
