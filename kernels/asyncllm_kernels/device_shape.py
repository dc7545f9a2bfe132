"""The device facts that size the kernels' grids, looked up once per device."""
from __future__ import annotations

import functools

import torch

SMEM_PER_SM = 228 * 1024  # bytes, where the device does not say (H100, H200)
CPU_SMS = 4  # the stand-in under Triton's interpreter


@functools.cache
def device_shape(device: torch.device) -> tuple[int, int]:
    """SMs and shared memory per SM (bytes) of `device`; a stand-in on the CPU (Triton's interpreter)."""
    if device.type != "cuda":
        return CPU_SMS, SMEM_PER_SM
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_multiprocessor", 0) or SMEM_PER_SM
