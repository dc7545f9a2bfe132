"""Grammar masks (structured outputs): logits[rows[i], v] = -inf wherever bit v of bitmask[i] is 0, in place, in
one kernel. bitmask [R, ceil(V / 32)] int32, bit j of word w is token 32 w + j (xgrammar's layout).
`asyncllm.engine.grammar.apply_bitmask_ref` is the same in torch (the CPU path and the kernel's test)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # tokens per program (32 bitmask words)


@triton.jit
def _apply_kernel(logits_ptr, rows_ptr, mask_ptr, vocab, stride_logits, stride_mask, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = v < vocab
    row = tl.load(rows_ptr + i).to(tl.int64)
    word = tl.load(mask_ptr + i * stride_mask + v // 32, mask=inside, other=-1)
    banned = ((word >> (v % 32)) & 1) == 0
    ptr = logits_ptr + row * stride_logits + v
    tl.store(ptr, tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty), mask=inside & banned)


def apply_token_bitmask_(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [N, V] (rows contiguous), rows [R] int, bitmask [R, >= ceil(V / 32)] int32, all on one device."""
    assert logits.stride(-1) == 1 and bitmask.dtype == torch.int32 and bitmask.stride(-1) == 1
    n, vocab = len(rows), logits.shape[1]
    if n:
        _apply_kernel[(n, triton.cdiv(vocab, BLOCK))](logits, rows, bitmask, vocab, logits.stride(0), bitmask.stride(0),
                                                     BLOCK=BLOCK, num_warps=4)
