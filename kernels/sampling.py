"""Temperature sampling by the Gumbel-max trick in one pass over the logits: token = argmax(logit / T + G) with
G = -log(-log(U)), U ~ Uniform(0, 1) from Philox keyed by (seed, row * vocab + column). That is an exact draw from
softmax(logits / T), with no noise tensor in memory. Rows with T == 0 take the plain argmax."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def _gumbel_sample_kernel(logits_ptr, temp_ptr, best_ptr, idx_ptr, vocab, stride, seed, BLOCK: tl.constexpr):
    """Program (row, chunk): the best score and its column within one BLOCK of the row's vocabulary."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    t = tl.load(temp_ptr + row)
    greedy = t == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.rand(seed, row * vocab + cols)
    gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-30)))
    score = tl.where(greedy, x, x * inv_t + gumbel)
    score = tl.where(mask, score, -float("inf"))
    out = row * tl.num_programs(1) + chunk
    tl.store(best_ptr + out, tl.max(score, axis=0))
    tl.store(idx_ptr + out, (tl.argmax(score, axis=0) + chunk * BLOCK).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int, block: int = 4096) -> torch.Tensor:
    """logits [B, V] (any float dtype), temperature [B] float32 (0 = greedy) -> token ids [B] int64.
    The vocabulary is split in blocks (one program each, so batch 1 fills the GPU too); a second pass picks
    each row's best block."""
    assert logits.ndim == 2 and logits.stride(-1) == 1
    rows, vocab = logits.shape
    block = min(block, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_sample_kernel[(rows, chunks)](logits, temperature, best, idx, vocab, logits.stride(0), seed,
                                              BLOCK=block, num_warps=8)
    return idx.gather(1, best.argmax(1, keepdim=True)).squeeze(1)


def gumbel_sample_ref(logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same distribution in torch (not the same draws): softmax(logits / T) sampled, argmax where T == 0."""
    greedy = temperature == 0
    probs = (logits.float() / torch.where(greedy, 1.0, temperature)[:, None]).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(greedy, logits.argmax(-1), sampled)
