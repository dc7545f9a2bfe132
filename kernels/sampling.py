"""Temperature sampling by the Gumbel-max trick in one pass over the logits: token = argmax(logit / T + G) with
G = -log(-log(U)), U ~ Uniform(0, 1) from Philox keyed by (seed, row * vocab + column). That is an exact draw from
softmax(logits / T), with no noise tensor in memory. Rows with T == 0 take the plain argmax."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def _gumbel_sample_kernel(logits_ptr, temp_ptr, out_ptr, vocab, stride, seed, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row)
    greedy = t == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, t))
    best = -float("inf")
    best_idx = 0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + cols)
        gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-30)))
        score = tl.where(greedy, x, x * inv_t + gumbel)
        score = tl.where(mask, score, -float("inf"))
        block_best = tl.max(score, axis=0)
        block_idx = tl.argmax(score, axis=0) + start
        take = block_best > best
        best_idx = tl.where(take, block_idx, best_idx)
        best = tl.where(take, block_best, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: int) -> torch.Tensor:
    """logits [B, V] (any float dtype), temperature [B] float32 (0 = greedy) -> token ids [B] int64."""
    assert logits.ndim == 2 and logits.stride(-1) == 1
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _gumbel_sample_kernel[(rows,)](logits, temperature, out, vocab, logits.stride(0), seed,
                                       BLOCK=min(4096, triton.next_power_of_2(vocab)), num_warps=8)
    return out


def gumbel_sample_ref(logits: torch.Tensor, temperature: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same distribution in torch (not the same draws): softmax(logits / T) sampled, argmax where T == 0."""
    greedy = temperature == 0
    probs = (logits.float() / torch.where(greedy, 1.0, temperature)[:, None]).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(greedy, logits.argmax(-1), sampled)
