"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
before it on the stream is still finishing, so its launch and the reads that need nothing from earlier kernels
(weights) overlap the previous kernel's tail. A decode step of a small model is hundreds of short kernels, each
paying that latency otherwise.

Protocol every kernel launched with `pdl=True` keeps (it is what makes the overlap safe):
- before `wait_previous` it reads (or asks into L2: `prefetch_l2`) only what no kernel writes (weights): the previous
  kernels, and transitively every earlier one, may still run (each lets its dependents start at its top);
- `wait_previous` (griddepcontrol.wait: the previous kernel has completed and its writes are visible; it waited
  for its own predecessor in turn) comes before any other read and before any write, in every program;
- kernels launched without PDL (torch's, cuBLAS') wait for the whole previous kernel as usual.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Wait for the previous kernel on the stream (PDL), and let the next one start launching."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask the lines at `ptrs` (any shape; one address per 128-byte line is enough) into L2, waiting for nothing."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@functools.cache
def supported(device: torch.device) -> bool:
    """PDL on `device`: CUDA of compute capability 9 or more, and a Triton that launches with it."""
    if device.type != "cuda":
        return False
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict[str, Any]:
    """The launch keyword of a kernel call: `launch_pdl` only when used (Triton's interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}
