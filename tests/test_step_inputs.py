"""A step's packed inputs as every rank unpacks them (engine/step_inputs.py), for the CUDA-graph layout too, which
only a GPU replays: on the CPU, pack and unpack alone."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch
from asyncllm.engine.step_inputs import RowTables, pack, unpack
from asyncllm.sampling_params import SamplingParams


def decode_batch(feed: list[int]) -> tuple[Batch, list[Request]]:
    """One decode row per request (rows 5, 6, ...), each with two known blocks of four tokens, one of them unsent."""
    batch, reqs = Batch(), []
    for i, f in enumerate(feed):
        req = Request(f"r{i}", [10 * i + t for t in range(7)], SamplingParams(seed=i), 8, frozenset())
        req.block_table, req.num_synced_blocks, req.row = [2 * i, 2 * i + 1], 1, 5 + i
        req.num_computed_tokens = 6
        batch.add(req, 1)
        reqs.append(req)
    batch.feed = feed
    return batch, reqs


@pytest.mark.parametrize("pad_to", [0, 4])  # eager, or a CUDA graph's step padded to 4 rows
# the second row's input is the previous step's first sampled id; or every row's input is a sampled id (overlap)
@pytest.mark.parametrize("feed, ids", [([-1, 0, -1], [6, -1, 26]), ([1, 2, 0], [-2, -3, -1])])
def test_a_decode_step_packs_its_ids_positions_rows_and_sampled_rows(pad_to, feed, ids):
    batch, reqs = decode_batch(feed)
    tables = RowTables(16, 4, torch.device("cpu"))
    header, packed = pack(batch, pad_to, tables.dummy, random.Random(0), ())
    step = unpack(header, packed, tables, torch.device("cpu"))
    rows = pad_to or 3
    assert (header.num_seqs, header.num_tokens, header.num_sampled, header.graph) == (rows, rows, 3, int(pad_to > 0))
    assert step.ids.tolist() == ids + [0] * (rows - 3)
    assert step.positions.tolist() == [6, 6, 6] + [0] * (rows - 3)
    assert step.rows.tolist() == [5, 6, 7] + [tables.dummy] * (rows - 3)
    assert step.sample_seqs.tolist() == [0, 1, 2]  # padding rows never sample
    # each request's unsent block reached the tables; no request took its row in this step
    assert header.num_new_rows == 0 and step.new_rows.shape == (0, 6)
    assert [tables.host[5 + i, 1] for i in range(3)] == [1, 3, 5] and all(r.num_synced_blocks == 2 for r in reqs)
    assert np.array_equal(tables.device.numpy(), tables.host)


def test_a_request_taking_its_row_sends_its_sampling_parameters():
    batch, reqs = decode_batch([-1, -1])
    reqs[1].num_synced_blocks = 0  # admitted: its whole table and its parameters go out
    tables = RowTables(16, 4, torch.device("cpu"))
    header, packed = pack(batch, 0, tables.dummy, random.Random(0), ())
    step = unpack(header, packed, tables, torch.device("cpu"))
    assert header.num_new_rows == 1 and step.new_rows[:, 0].tolist() == [6]
    assert tables.host[6, :2].tolist() == [2, 3]
