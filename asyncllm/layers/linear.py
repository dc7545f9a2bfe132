"""Linear layers for fused checkpoint tensors and tensor parallelism.

Weight loading protocol: a parameter that needs more than a plain copy carries `weight_loader(param, tensor,
shard_id)`, which slices this rank's part out of the full checkpoint tensor (one tensor in memory at a time, so no
rank holds the model); a merged parameter also lists its parts in `shard_ids`, each of which must be loaded once.
Other parameters load with `default_weight_loader`. With TP 1 the slices are the whole tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from asyncllm import distributed
from asyncllm.errors import ModelLoadError
from asyncllm.layers import kernel_choice

SKINNY_MAX_ROWS = 16  # asyncllm_kernels.skinny_linear's (not imported here: Triton is optional on CPU)
# ... and the layers it takes: output features (per rank) up to this many. On the H200 (tools/bench_skinny_linear.py
# at 329aec4, one row) it beats cuBLAS where cuBLAS has few output tiles (Qwen3-0.6B's o and down, 1024 x 2048 / 3072:
# 5.1 / 6.0 us against 12.2 / 7.5; SmolLM2's four layers) and loses on wider ones (Qwen3's q|k|v, 4096 x 1024: 6.7
# against 5.4 us; every Llama-3.1-8B layer; and, though this rule gives it to the kernel, Llama's TP-4 q|k|v,
# 1536 x 4096: 8.7 against 8.4 us)
SKINNY_MAX_OUT = 2048
# gate|up with SwiGLU in the kernel's epilogue: up to this many merged output features (each half's bound)
SKINNY_SWIGLU_MAX_OUT = 2 * SKINNY_MAX_OUT
# Tried and removed, measured slower: the RMSNorm before q|k|v and gate|up (with its residual add) in the kernel's
# prologue (Qwen3-0.6B batch 1 on an H100: 1.490 ms per token against 1.219, df90a81; 1.585 against 1.230 with
# narrower tiles, 1b0d0b6; SmolLM2-135M batch 1 and 16: 0.94-0.97 against 0.73, 1.03 against 0.77, 8aaeb11), the
# SwiGLU in the down projection's prologue, the residual add + norm after o and down (docs/BENCHMARKS.md)

ShardId = str | int | None


def few_rows(x: torch.Tensor) -> bool:
    """x [M, K] is small enough for asyncllm_kernels.skinny_linear (decode steps of small batches)."""
    return x.ndim == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.stride(-1) == 1


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skinny: bool,
           pdl: bool = False) -> torch.Tensor:
    """x W^T + b: by asyncllm_kernels.skinny_linear when `skinny` (CUDA) and x has few rows (launched with
    programmatic dependent launch when `pdl`), else by torch."""
    if skinny and few_rows(x):
        from asyncllm_kernels import skinny_linear

        return skinny_linear(x, weight, bias, pdl=pdl)
    return nn.functional.linear(x, weight, bias)


def _check(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(f"shape mismatch for {what}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}")


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor, shard_id: ShardId = None) -> None:
    """A plain copy of a whole, unsharded tensor."""
    if shard_id is not None:
        raise ModelLoadError(f"a part {shard_id!r} of a parameter that has no parts")
    _check(param.data, tensor, "a replicated parameter")
    param.data.copy_(tensor)


class MergedLinear(nn.Module):
    """Column-parallel matmul whose output is the concatenation of named parts (fused q|k|v, gate|up), each loaded
    from its own checkpoint tensor.

    `parts` maps a shard id (e.g. "q", "k", "v" or 0, 1) to (output features on this rank, index of this rank's
    slice of that checkpoint tensor's rows), in output order.
    """

    def __init__(self, in_features: int, parts: dict[str | int, tuple[int, int]], bias: bool = False) -> None:
        super().__init__()
        self.offsets: dict[str | int, tuple[int, int, int]] = {}
        start = 0
        for shard, (size, index) in parts.items():
            self.offsets[shard] = (start, size, index)
            start += size
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.empty(start)) if bias else None
        # Triton matmul for few rows (CUDA fast path); SwiGLU in its epilogue where each half is narrow enough
        self.skinny = kernel_choice.current().skinny_matmul and start <= SKINNY_MAX_OUT
        self.skinny_swiglu = kernel_choice.current().skinny_matmul and start <= SKINNY_SWIGLU_MAX_OUT
        self.pdl = kernel_choice.current().pdl
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_part  # type: ignore[attr-defined]
                param.shard_ids = tuple(self.offsets)  # type: ignore[attr-defined]

    def _load_part(self, param: torch.Tensor, tensor: torch.Tensor, shard: ShardId) -> None:
        """Copy this rank's rows of checkpoint tensor `tensor` into part `shard` of `param` (weight or bias)."""
        if shard not in self.offsets:
            raise ModelLoadError(f"no part {shard!r} in a merged layer of parts {list(self.offsets)}")
        start, size, index = self.offsets[shard]
        if tensor.shape[0] < (index + 1) * size:
            raise ModelLoadError(f"shape mismatch for part {shard!r}: checkpoint {tuple(tensor.shape)}, model needs "
                                 f"rows {index * size}..{(index + 1) * size}")
        src = tensor.narrow(0, index * size, size)
        dst = param.data.narrow(0, start, size)
        _check(dst, src, f"part {shard!r}")
        dst.copy_(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias, self.skinny, self.pdl)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of the two equal parts gate | up in the matmul's epilogue, when the Triton kernel takes
        x (`skinny_swiglu` and few_rows(x)); else None."""
        if not (self.skinny_swiglu and few_rows(x)):
            return None
        from asyncllm_kernels import skinny_linear

        return skinny_linear(x, self.weight, self.bias, swiglu=True, pdl=self.pdl)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns across ranks (o_proj, down_proj). Each rank returns its partial
    sum (the bias counted on rank 0 only): the next RMSNorm all-reduces it (RMSNorm(reduce=True))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = distributed.current()
        self.in_start, in_end = distributed.shard_range(in_features, self.tp.rank, self.tp.size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, in_end - self.in_start))
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.skinny = kernel_choice.current().skinny_matmul and out_features <= SKINNY_MAX_OUT  # (see MergedLinear)
        self.pdl = kernel_choice.current().pdl

    def _load_weight(self, param: torch.Tensor, tensor: torch.Tensor, shard_id: ShardId = None) -> None:
        if tensor.dim() != 2 or tensor.shape[1] < self.in_start + self.weight.shape[1]:
            raise ModelLoadError(f"shape mismatch for a row-parallel weight: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(self.weight.shape)} (of {self.tp.size} ranks)")
        src = tensor.narrow(1, self.in_start, self.weight.shape[1])
        _check(self.weight.data, src, "row-parallel weight")
        self.weight.data.copy_(src)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum (the bias counted on rank 0 only)."""
        return matmul(x, self.weight, self.bias if self.tp.rank == 0 else None, self.skinny, self.pdl)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary across ranks (the vocabulary padded to a multiple of the TP size). Also the
    weight of the (tied or untied) LM head, whose logits are gathered from every rank's vocabulary slice."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = distributed.current()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]

    def _load_weight(self, param: torch.Tensor, tensor: torch.Tensor, shard_id: ShardId = None) -> None:
        if tensor.shape != (self.vocab_size, self.weight.shape[1]):
            raise ModelLoadError(f"shape mismatch for the vocabulary matrix: checkpoint {tuple(tensor.shape)}, "
                             f"model {(self.vocab_size, self.weight.shape[1])}")
        rows = tensor[self.start : self.start + self.per_rank]
        self.weight.data.zero_()
        self.weight.data[: len(rows)].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = nn.functional.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside[:, None]
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> logits [T, vocab] (every rank gets all of them), into `out` when given."""
        if out is not None and self.tp.size == 1 and self.weight.shape[0] == self.vocab_size:
            return torch.mm(hidden, self.weight.t(), out=out)
        logits = self.tp.all_gather_last_dim(nn.functional.linear(hidden, self.weight))[:, : self.vocab_size]
        return logits if out is None else out.copy_(logits)
