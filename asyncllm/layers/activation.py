from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.layers import kernel_choice


class SiluAndMul(nn.Module):
    """[..., 2H] (gate | up) -> [..., H] = silu(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = kernel_choice.current().fused  # one Triton kernel instead of two (CUDA fast path)
        self.pdl = kernel_choice.current().pdl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.ndim == 2 and x.stride(-1) == 1:
            from asyncllm_kernels import silu_and_mul

            return silu_and_mul(x, pdl=self.pdl)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
