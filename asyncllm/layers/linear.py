"""Linear layers whose weights load from several checkpoint tensors (fused q|k|v, fused gate|up)."""
from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Module):
    """One matmul whose output is the concatenation of named parts, each loaded from its own checkpoint tensor.

    `parts` maps a shard id (e.g. "q", "k", "v" or 0, 1) to its number of output features, in output order.
    """

    def __init__(self, in_features: int, parts: dict[str | int, int], bias: bool = False) -> None:
        super().__init__()
        self.offsets: dict[str | int, tuple[int, int]] = {}
        start = 0
        for shard, size in parts.items():
            self.offsets[shard] = (start, size)
            start += size
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start)) if bias else None

    def load_shard(self, shard: str | int, name: str, tensor: torch.Tensor) -> None:
        """Copy checkpoint tensor `tensor` (a weight or a bias, per `name`) into part `shard`."""
        start, size = self.offsets[shard]
        param = self.bias if name == "bias" else self.weight
        if param is None:
            raise ValueError("checkpoint has a bias for a layer built without one")
        dst = param.data.narrow(0, start, size)
        if dst.shape != tensor.shape:
            raise ValueError(f"shape mismatch for part {shard!r}: checkpoint {tuple(tensor.shape)}, model {tuple(dst.shape)}")
        dst.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)
