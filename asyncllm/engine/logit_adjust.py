"""A step's logit adjustments besides grammar masks, as the sampler takes them (rank 0): repetition, presence and
frequency penalties (per-row token counts kept on the device), and logit_bias with min_tokens' banned ids.
`rows` are the batch's rows whose request uses the adjustment; `sample_index` maps a batch row to its row among
the step's sampled logits."""
from __future__ import annotations

import math

import numpy as np
import torch

from asyncllm.device import to_device
from asyncllm.engine.scheduler import Batch
from asyncllm.layers.sampler import LogitBias, Penalties, PenaltyCounts, PenaltyRebuild


def step_penalties(batch: Batch, rows: list[int], sample_index: np.ndarray, state: PenaltyCounts | None,
                   device: torch.device) -> Penalties | None:
    """The penalties of the sampling rows that use them, or None. Host work per step is per row, plus, once
    for a request (or again after it moved to another row), its known tokens to rebuild its row's counts."""
    assert state is not None, "penalties are applied on rank 0"
    sampling = [i for i in rows if batch.sample[i]]
    if not sampling:
        return None
    reqs = [batch.requests[i] for i in sampling]
    stale = [r for r in reqs if state.owner[r.row] is not r]
    rebuild = None
    if stale:  # no token of theirs is in flight: a request samples here first, or was admitted again
        for r in stale:
            state.owner[r.row] = r
        output = [np.column_stack((np.full(r.num_output_tokens, r.row), r.output_token_ids)) for r in stale]
        known = [np.column_stack((np.full(len(r.token_ids), r.row), r.token_ids)) for r in stale]
        rebuild = PenaltyRebuild(to_device([r.row for r in stale], device),
                                 to_device(np.concatenate(output).reshape(-1, 2), device),
                                 to_device(np.concatenate(known), device))
    per_row = to_device([[r.params.presence_penalty for r in reqs], [r.params.frequency_penalty for r in reqs],
                         [r.params.repetition_penalty for r in reqs]], device, torch.float32)
    return Penalties(state, rows=to_device(sample_index[sampling], device),
                     table_rows=to_device([r.row for r in reqs], device), presence=per_row[0],
                     frequency=per_row[1], repetition=per_row[2], rebuild=rebuild)


def step_logit_bias(batch: Batch, rows: list[int], sample_index: np.ndarray, device: torch.device) -> LogitBias | None:
    """logit_bias entries, and -inf for EOS (unless ignore_eos) and stop_token_ids while a row samples an
    output token before its min_tokens-th."""
    index: list[tuple[int, int]] = []
    value: list[float] = []
    for i in rows:
        req = batch.requests[i]
        p = req.params
        if not batch.sample[i]:
            continue
        row = int(sample_index[i])
        if p.logit_bias:
            index += [(row, t) for t in p.logit_bias]
            value += p.logit_bias.values()
        # the token sampled now is output token number num_output_tokens + num_pending - 1 (0-based)
        if p.min_tokens and req.num_output_tokens + req.num_pending - 1 < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else req.eos_token_ids)
            index += [(row, t) for t in banned]
            value += [-math.inf] * len(banned)
    if not index:
        return None
    return LogitBias(to_device(index, device), to_device(value, device, torch.float32))
