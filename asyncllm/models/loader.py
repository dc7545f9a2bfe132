"""Weights: streamed tensor by tensor from safetensors (one file or sharded), or random (`load_format="dummy"`)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from asyncllm.errors import ModelLoadError, ModelNotFoundError
from asyncllm.models.llama import CausalLM


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {model_dir} (use load_format='dummy' for random weights)")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time."""
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
                for name in names:
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read weights {path}: {e} (truncated or corrupt? copy or convert the "
                                 "checkpoint again)") from e


def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    missing = model.check_loaded(model.load_weights(iter_safetensors(model_dir)))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ModelLoadError(f"checkpoint in {model_dir} lacks weights for: {', '.join(missing[:8])}{more}")


@torch.no_grad()
def init_dummy(model: CausalLM, seed: int) -> None:
    """Random weights with the scale of a trained model (norms at 1), for benchmarks."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
            continue
        gen = gens.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
        param.normal_(0.0, 0.02, generator=gen)
