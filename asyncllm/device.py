"""Where tensors live, and how host data reaches the device without stalling the host.

A copy from pageable host memory to CUDA waits for the stream to drain (torch synchronizes it), so every
host -> device copy of a step goes through page-locked memory with `non_blocking=True`. Torch's caching host
allocator does not hand a pinned block out again before the copy that reads it has run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from asyncllm.errors import InvalidRequestError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device='cuda' but no CUDA GPU is available", "device")
    return torch.device(name)


def host_tensor(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A CPU tensor of `values`, page-locked when it is meant for a CUDA device."""
    t = torch.as_tensor(np.asarray(values), dtype=dtype) if not isinstance(values, torch.Tensor) else values.to(dtype)
    return t.pin_memory() if device.type == "cuda" else t


def to_device(values: Any, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Host values (list, ndarray or CPU tensor) -> a tensor on `device`, never blocking on the GPU."""
    return host_tensor(values, dtype, device).to(device, non_blocking=True)
