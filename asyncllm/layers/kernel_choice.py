"""Which kernels the layers run, chosen once, when the model is built (the runner builds it inside `choose`):
Triton kernels on the GPU fast path, torch everywhere else (CPU, the torch attention backend). A layer reads the
choice in its constructor and keeps it; nothing flips it afterwards."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelChoice:
    fused: bool = False  # Triton RMSNorm (+ residual add), SwiGLU, q/k norm with the rotary + KV-store kernel
    skinny_matmul: bool = False  # matmuls of a few rows by asyncllm_kernels.skinny_linear (SwiGLU in its epilogue)
    pdl: bool = False  # those Triton kernels launched with programmatic dependent launch (Hopper and later; see
    # asyncllm_kernels.dependent_launch)


_current = KernelChoice()


def current() -> KernelChoice:
    return _current


@contextlib.contextmanager
def choose(choice: KernelChoice) -> Iterator[None]:
    """Layers built inside the block take `choice`."""
    global _current
    previous, _current = _current, choice
    try:
        yield
    finally:
        _current = previous
