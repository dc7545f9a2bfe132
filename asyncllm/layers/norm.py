"""RMSNorm with an optional fused residual add (same arithmetic as transformers' LlamaRMSNorm), and under tensor
parallelism the all-reduce of its input (the partial sums of a row-parallel matmul) before the add."""
from __future__ import annotations

import torch
from torch import nn

from asyncllm import distributed
from asyncllm.layers import kernel_choice


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis in torch, rounded like transformers' LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, exchange_slot: int = 0) -> None:
        """exchange_slot (0 or 1): the fused all-reduce's buffer; norms that reduce one after the other on a step's
        path alternate slots (see asyncllm_kernels.allreduce_norm)."""
        super().__init__()
        self.eps = eps
        self.exchange_slot = exchange_slot
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.fused = kernel_choice.current().fused  # Triton kernel (CUDA fast path)
        self.pdl = kernel_choice.current().pdl
        self.tp = distributed.current()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_torch(x, self.weight, self.eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with `residual`: (norm(x + residual), x + residual). `reduce`: x is this rank's partial sum
        (tensor parallelism) and the sum over ranks is used: the all-reduce sits here, before the add, so that over
        symmetric memory one kernel does all three (SymmetricMemoryAllReduce.add_rms_norm)."""
        if reduce:
            symm = self.tp.small_all_reduce
            if self.fused and residual is not None and symm is not None and symm.fits(x) and x.ndim == 2:
                return symm.add_rms_norm(x, residual, self.weight, self.eps, self.exchange_slot), residual
            x = self.tp.all_reduce(x)
        if self.fused and x.ndim == 2 and x.stride(-1) == 1:
            from asyncllm_kernels import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps, pdl=self.pdl)
            return rms_norm(x, self.weight, self.eps, residual=residual, pdl=self.pdl), residual  # in place
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer's norm: (norm(x), x) for the first (x the embeddings, no residual yet), else
        self(x, residual, reduce=True) (x a row-parallel matmul's partial sums)."""
        if residual is None:
            return self(x), x
        return self(x, residual, reduce=True)
