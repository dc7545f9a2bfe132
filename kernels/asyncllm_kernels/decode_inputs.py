"""A decode graph's inputs in one kernel: what were a dozen small torch kernels at the head of each replay.

Per row r (one program each): the input id (ids[r] >= 0 as given; a pending id -(k + 1) is the previous step's
sampled[k]), the KV slot of the token at positions[r] (-1 for the dummy row, whose tokens are not stored), the
sequence length positions[r] + 1, and the row's block table (tables[rows[r]], every column) copied into the
batch's tables.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # table columns a program copies per iteration


@triton.jit
def _decode_inputs_kernel(ids_ptr, pos_ptr, rows_ptr, tables_ptr, sampled_ptr, input_ids_ptr, slots_ptr,
                          seq_lens_ptr, batch_tables_ptr, width, dummy, block_size, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    token = tl.load(ids_ptr + r)
    pos = tl.load(pos_ptr + r)
    row = tl.load(rows_ptr + r)
    fed = tl.load(sampled_ptr + tl.maximum(-token - 1, 0))
    tl.store(input_ids_ptr + r, tl.where(token < 0, fed, token))
    table = tables_ptr + row * width
    block = tl.load(table + pos // block_size)
    tl.store(slots_ptr + r, tl.where(row == dummy, -1, block * block_size + pos % block_size))
    tl.store(seq_lens_ptr + r, pos + 1)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        tl.store(batch_tables_ptr + r * width + cols, tl.load(table + cols, mask=mask), mask=mask)


def decode_inputs(ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tables: torch.Tensor,
                  sampled: torch.Tensor, dummy: int, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, positions, rows [B] int64; tables [R, W] int64 (row `dummy` among them); sampled [S] int64 ->
    (input ids [B], KV slots [B], sequence lengths [B], block tables [B, W]), all int64."""
    n, width = ids.shape[0], tables.shape[1]
    assert tables.is_contiguous() and all(t.is_contiguous() and t.dtype == torch.int64
                                          for t in (ids, positions, rows, tables, sampled))
    input_ids, slots, seq_lens = torch.empty(3, n, dtype=torch.int64, device=ids.device)
    batch_tables = torch.empty(n, width, dtype=torch.int64, device=ids.device)
    if n:
        _decode_inputs_kernel[(n,)](ids, positions, rows, tables, sampled, input_ids, slots, seq_lens, batch_tables,
                                    width, dummy, block_size, BLOCK=min(BLOCK, triton.next_power_of_2(width)))
    return input_ids, slots, seq_lens, batch_tables
