"""Log-probabilities of sampled and prompt tokens (SamplingParams.logprobs / prompt_logprobs).

They are of the model's own distribution: log-softmax of the raw logits in float32, before repetition penalties,
logit_bias, min_tokens, temperature and top-k/top-p/min-p (as vLLM's default `raw_logprobs`). Rank 0 plans what a
step reports (`plan_logprobs`), computes it on the device in the step's stream (`LogprobsOnDevice`), copies it to
the host with the sampled ids, and turns it into `StepLogprobs` once the step's event fired (`read`).

Prompt positions need the logits of every token of a prefill chunk, not only its last: the step carries their
indices (`StepHeader.num_prompt_lp`), because computing logits is a collective with tensor parallelism (every rank
gathers the vocabulary shards), and they are computed in slices of PROMPT_SLICE tokens so a long chunk never
holds [chunk, vocab] float32 logits at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from asyncllm.device import to_device
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch, StepLogprobs
from asyncllm.outputs import Logprob

PROMPT_SLICE = 512


@dataclass
class LogprobPlan:
    """Rank 0: what one step reports. Sampled rows are batch rows whose request has `logprobs`; prompt rows are
    batch rows whose chunk predicts prompt tokens still missing their log-probability."""

    sample_rows: list[int] = field(default_factory=list)  # batch rows
    sample_index: list[int] = field(default_factory=list)  # their rows among the step's sampled logits
    sample_k: list[int] = field(default_factory=list)
    prompt_rows: list[tuple[int, int, int, int]] = field(default_factory=list)  # (row, first position, count, k)
    prompt_tokens: list[int] = field(default_factory=list)  # step token index predicting each position
    prompt_targets: list[int] = field(default_factory=list)  # the prompt token at that position

    def __bool__(self) -> bool:
        return bool(self.sample_rows or self.prompt_tokens)


def plan_logprobs(batch: Batch, rows: list[int]) -> LogprobPlan | None:
    """The plan for `rows` (batch rows whose request has extras: `Request.extras`)."""
    plan = LogprobPlan()
    offsets: list[int] | None = None
    sample_index = None
    for i in rows:
        req: Request = batch.requests[i]
        p = req.params
        if p.logprobs is not None and batch.sample[i]:
            if sample_index is None:
                sample_index = np.cumsum(batch.sample) - 1
            plan.sample_rows.append(i)
            plan.sample_index.append(int(sample_index[i]))
            plan.sample_k.append(p.logprobs)
        if req.prompt_logprobs is not None:
            start, n = batch.starts[i], batch.num_new_tokens[i]
            first = max(start + 1, len(req.prompt_logprobs))  # position p + 1 is predicted by token p
            last = min(start + n, req.num_prompt_tokens - 1)
            if first <= last:
                if offsets is None:
                    offsets = np.concatenate([[0], np.cumsum(batch.num_new_tokens)]).tolist()
                base = offsets[i] - start - 1  # step index of the token predicting position q: base + q
                plan.prompt_rows.append((i, first, last - first + 1, p.prompt_logprobs))
                plan.prompt_tokens.extend(range(base + first, base + last + 1))
                plan.prompt_targets.extend(req.token_ids[first : last + 1])
    return plan if plan else None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[torch.Tensor]:
    """logits [R, V] (any float dtype), targets [R] -> [target's logprob [R] float32, top-k logprobs [R, k]
    float32, their ids [R, k] int64] (only the first when k == 0)."""
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    out = [x.gather(1, targets[:, None])[:, 0] - lse]
    if k:
        values, ids = x.topk(k, -1)
        out += [values - lse[:, None], ids]
    return out


class LogprobsOnDevice:
    """Rank 0, one step: the device tensors of a plan's results, then their host copies."""

    def __init__(self, plan: LogprobPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.sample_k = max(plan.sample_k, default=0)
        self.prompt_k = max((k for *_, k in plan.prompt_rows), default=0)
        self.prompt_parts: list[list[torch.Tensor]] = []
        self.sampled: list[torch.Tensor] = []
        self.raw: torch.Tensor | None = None
        self._targets = to_device(plan.prompt_targets, device) if plan.prompt_targets else None

    def prompt_slice(self, start: int, logits: torch.Tensor) -> None:
        """Logits of the prompt tokens plan.prompt_tokens[start : start + len(logits)]."""
        assert self._targets is not None
        self.prompt_parts.append(token_logprobs(logits, self._targets[start : start + len(logits)], self.prompt_k))

    def keep_raw(self, logits: torch.Tensor) -> None:
        """Before the logits of the sampled rows are adjusted in place: a float32 copy of the reported rows."""
        if self.plan.sample_rows:
            self.index = to_device(self.plan.sample_index, self.device)  # page-locked: never waits on the GPU
            self.raw = logits.index_select(0, self.index).float()

    def sampled_ids(self, sampled: torch.Tensor) -> None:
        """After sampling into `sampled` (rows of the step's sampled logits)."""
        if self.raw is not None:
            self.sampled = token_logprobs(self.raw, sampled.index_select(0, self.index), self.sample_k)
            self.raw = None

    def to_host(self) -> None:
        """Start the copies to the host (page-locked; complete once the step's event fired)."""
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", non_blocking=True) if t.device.type == "cuda" else t

        self.sampled = [host(t) for t in self.sampled]
        if self.prompt_parts:
            self.prompt_parts = [[host(torch.cat(parts)) for parts in zip(*self.prompt_parts)]]

    def read(self, tokens: list[int]) -> StepLogprobs:
        """The host results (after the step's event); `tokens`: the step's sampled ids."""
        out = StepLogprobs()
        plan = self.plan
        if self.sampled:
            targets = [tokens[j] for j in plan.sample_index]
            out.sampled = dict(zip(plan.sample_rows, _rows(self.sampled, plan.sample_k, targets)))
        if self.prompt_parts:
            ks = [k for _, _, n, k in plan.prompt_rows for _ in range(n)]
            lps = _rows(self.prompt_parts[0], ks, plan.prompt_targets)
            at = 0
            for i, first, n, _ in plan.prompt_rows:
                out.prompt[i] = list(zip(range(first, first + n), lps[at : at + n]))
                at += n
        return out


def _rows(parts: list[torch.Tensor], ks: list[int], targets: list[int]) -> list[Logprob]:
    chosen = parts[0].tolist()
    if len(parts) == 1:
        return [Logprob(t, c) for t, c in zip(targets, chosen)]
    values, ids = parts[1].tolist(), parts[2].tolist()
    return [Logprob(t, c, list(zip(i[:k], v[:k]))) for t, c, v, i, k in zip(targets, chosen, values, ids, ks)]
