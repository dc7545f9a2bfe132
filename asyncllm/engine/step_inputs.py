"""A step's inputs: what rank 0 packs on the host, what every rank unpacks on the device.

Per-row state stays on the device between steps (a row is the scheduler's slot of a running request,
`Request.row`): the block tables ([rows + 1, max_blocks] int64, the last row a dummy of zeros for padded graph
rows, with a host mirror for the attention plan) and the sampling parameters (the sampler's). A step sends only
what changed: a request's whole table and its parameters when it takes a row, then each block it gains, and the
blocks the prefix cache swaps (the scheduler lowers `num_synced_blocks` to resend them). Per token it sends its
id and position, per sequence its row. So a decode step of B requests costs 3B integers, whatever the contexts.

Packed int64 layout (sizes in StepHeader): ids [T] | positions [T] | rows [B] | query_start_loc [B+1] |
sample_seqs [S] | table updates [U x (row, column, block)] | new rows [P x (row, temperature, top_k, top_p,
min_p, seed)], the floats as float64 bit patterns | prompt-logprob tokens [L] (indices into the step's tokens
whose logits are reported: engine/logprobs.py). An id < 0 is -(k + 1): the k-th sampled id of the previous
step, still on the device (overlap scheduling). A decode step padded for a CUDA graph of size bs has T = B = bs,
its padding rows being the dummy row at position 0 (their K/V go nowhere: slot -1). Each part starts on a
16-byte boundary (parts are padded to an even length): Triton specializes kernels on pointer alignment, and a
slice that is aligned in one step and not in the next would compile a new variant mid-run.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from asyncllm.device import to_device
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch, StepLogprobs
from asyncllm.layers.attention import AttentionMetadata
from asyncllm.step_broadcast import END

if TYPE_CHECKING:
    from asyncllm.engine.logprobs import LogprobsOnDevice

NEW_ROW_FIELDS = 6


def even(n: int) -> int:
    """Parts of the packed array take an even number of int64s: every part starts 16-byte aligned."""
    return n + (n & 1)


@dataclass
class StepHeader:
    """Sizes of one step's packed array; rank 0 sends [1, sizes..., packed...] to the followers, [0] to stop."""

    num_seqs: int
    num_tokens: int
    num_sampled: int
    num_updates: int
    num_new_rows: int
    graph: int = 0  # 1: a decode step padded to a CUDA graph's size, every real row sampling (rank 0 decides)
    num_prompt_lp: int = 0

    STOP: ClassVar[np.ndarray] = END  # the transports' last message

    def sizes(self) -> list[int]:
        """Lengths of the parts (each stored padded to an even length)."""
        b, t = self.num_seqs, self.num_tokens
        return [t, t, b, b + 1, self.num_sampled, 3 * self.num_updates, NEW_ROW_FIELDS * self.num_new_rows,
                self.num_prompt_lp]

    def encode(self, packed: np.ndarray) -> np.ndarray:
        sizes = [1, self.num_seqs, self.num_tokens, self.num_sampled, self.num_updates, self.num_new_rows, self.graph,
                 self.num_prompt_lp]
        return np.concatenate([np.asarray(sizes, dtype=np.int64), packed])

    @staticmethod
    def decode(msg: np.ndarray) -> tuple[StepHeader, np.ndarray] | None:
        if msg[0] == 0:
            return None
        return StepHeader(*(int(x) for x in msg[1:8])), msg[8:]


def table_updates(requests: list[Request]) -> tuple[list[int], list[Request]]:
    """Rank 0: the (row, column, block) triples (flat) that bring the device tables up to the requests' block
    tables, and the requests that just took their row (their sampling parameters go out too). Marks them sent."""
    flat: list[int] = []
    new: list[Request] = []
    for r in requests:
        table, synced = r.block_table, r.num_synced_blocks
        if len(table) > synced:
            if synced == 0:
                new.append(r)
            for c in range(synced, len(table)):
                flat += (r.row, c, table[c])
            r.num_synced_blocks = len(table)
    return flat, new


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


NO_NEW_ROWS = np.empty((0, NEW_ROW_FIELDS), dtype=np.int64)


def new_row_fields(requests: list[Request], rng: random.Random) -> np.ndarray:
    """[P, 6] int64: each request's row and sampling parameters. A request without a seed gets one from `rng`
    once (its draws then depend on it and its positions only)."""
    out = np.empty((len(requests), NEW_ROW_FIELDS), dtype=np.int64)
    floats = np.empty((len(requests), 3), dtype=np.float64)
    for i, r in enumerate(requests):
        p = r.params
        if r.sample_seed is None:
            r.sample_seed = _signed64(p.seed) if p.seed is not None else rng.getrandbits(63)
        out[i, 0], out[i, 2], out[i, 5] = r.row, p.top_k, r.sample_seed
        floats[i] = (0.0 if p.greedy else p.temperature, p.top_p, p.min_p)
    out[:, [1, 3, 4]] = floats.view(np.int64)
    return out


def pack(batch: Batch, pad_to: int, dummy_row: int, rng: random.Random,
         prompt_lp: Sequence[int]) -> tuple[StepHeader, np.ndarray]:
    """Rank 0: the step's packed host array. `pad_to` > 0: a CUDA-graph step (one token per row, every row
    sampling) padded to that many rows. `prompt_lp`: the tokens whose logits the step reports (eager only)."""
    reqs, starts, feed = batch.requests, batch.starts, batch.feed
    n_new = batch.num_new_tokens
    b = len(reqs)
    flat_updates, new = table_updates(reqs)
    rows = [r.row for r in reqs]
    if pad_to:  # decode only: one token per row
        pad = pad_to - b
        if min(feed) >= 0:  # (overlap) every row's input is the previous step's sampled id
            ids = np.zeros(pad_to, dtype=np.int64)
            np.subtract(-1, feed, out=ids[:b])
        else:
            ids = [r.token_ids[s] if f < 0 else -f - 1 for r, s, f in zip(reqs, starts, feed)] + [0] * pad
        positions = np.asarray(starts + [0] * pad, dtype=np.int64)
        rows += [dummy_row] * pad
        qsl = np.arange(pad_to + 1, dtype=np.int64)
        b = pad_to
    else:
        ids = []
        for r, s, n, f in zip(reqs, starts, n_new, feed):
            if f < 0:
                ids += r.token_ids[s : s + n]
            else:  # the last input token is on the device
                ids += r.token_ids[s : s + n - 1]
                ids.append(-f - 1)
        n_arr = np.asarray(n_new, dtype=np.int64)
        qsl = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(n_arr, out=qsl[1:])
        positions = np.repeat(np.asarray(starts, dtype=np.int64) - qsl[:-1], n_arr) + np.arange(qsl[-1])
    # a graph step samples every row (graph_size); a list of bools into numpy costs ~0.1 us a row
    sample_seqs = np.arange(len(reqs)) if pad_to else np.flatnonzero(batch.sample)
    new_rows = new_row_fields(new, rng) if new else NO_NEW_ROWS
    header = StepHeader(b, len(ids), len(sample_seqs), len(flat_updates) // 3, len(new), int(pad_to > 0),
                        len(prompt_lp))
    parts = [ids, positions, rows, qsl, sample_seqs, flat_updates, new_rows.reshape(-1), prompt_lp]
    packed = np.zeros(sum(even(n) for n in header.sizes()), dtype=np.int64)
    at = 0
    for part, n in zip(parts, header.sizes()):
        packed[at : at + n] = part
        at += even(n)
    return header, packed


class RowTables:
    """The block tables of every row, on the device and mirrored on the host; row `dummy` stays zeros."""

    def __init__(self, num_rows: int, max_blocks: int, device: torch.device) -> None:
        self.dummy = num_rows
        self.device = torch.zeros(num_rows + 1, max_blocks, dtype=torch.int64, device=device)
        self.host = np.zeros((num_rows + 1, max_blocks), dtype=np.int64)

    def apply(self, host: np.ndarray, dev: torch.Tensor) -> None:
        """Table updates [U, 3] (row, column, block), the same ones on the host and on the device (through flat
        indices: two kernels, where indexing by a (rows, columns) pair costs the host several times more)."""
        width = self.host.shape[1]
        self.host.reshape(-1)[host[:, 0] * width + host[:, 1]] = host[:, 2]
        self.device.view(-1).index_copy_(0, torch.add(dev[:, 1], dev[:, 0], alpha=width), dev[:, 2])


class Step:
    """One step unpacked on the device: the packed array copied whole, its parts as views made when first read (a
    decode step replayed from a graph reads only a few of them), and the host parts the attention plan needs."""

    def __init__(self, header: StepHeader, packed: torch.Tensor, host: np.ndarray) -> None:
        self.header, self.packed, self.host = header, packed, host
        self.sizes = header.sizes()
        self.starts = np.cumsum([0] + [even(n) for n in self.sizes]).tolist()

    def part(self, k: int) -> torch.Tensor:
        return self.packed[self.starts[k] : self.starts[k] + self.sizes[k]]

    def host_part(self, k: int) -> np.ndarray:
        return self.host[self.starts[k] : self.starts[k] + self.sizes[k]]

    ids = property(lambda self: self.part(0))  # [T] as packed: ids, or -(k + 1) for the previous step's k-th sampled id
    positions = property(lambda self: self.part(1))  # [T]
    rows = property(lambda self: self.part(2))  # [B]
    query_start_loc = property(lambda self: self.part(3))  # [B + 1]
    sample_seqs = property(lambda self: self.part(4))  # [S]
    new_rows = property(lambda self: self.part(6).view(-1, NEW_ROW_FIELDS))  # [P, 6]
    prompt_lp = property(lambda self: self.part(7))  # [L] tokens whose logits are reported
    host_positions = property(lambda self: self.host_part(1))
    host_rows = property(lambda self: self.host_part(2))
    host_qsl = property(lambda self: self.host_part(3))


# page-locked staging buffers of packed steps (int64s each; a larger step takes a pinned copy of its own)
PACKED_STAGING = 1 << 16


def unpack(header: StepHeader, packed: np.ndarray, tables: RowTables, device: torch.device,
           staging: HostRing | None = None) -> Step:
    """The packed array on the device in one copy (through `staging` when it fits); the table updates applied
    (host and device)."""
    if staging is not None and len(packed) <= PACKED_STAGING:
        buf = staging.take(len(packed))
        buf.numpy()[:] = packed
        dev = buf.to(device, non_blocking=True)
    else:
        dev = to_device(packed, device)
    step = Step(header, dev, packed)
    if header.num_updates:
        tables.apply(step.host_part(5).reshape(-1, 3), step.part(5).view(-1, 3))
    return step


def feed_ids(ids: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """The input ids, pending ones (-(k + 1)) taken from the previous step's sampled ids."""
    return torch.where(ids < 0, sampled.index_select(0, (-ids - 1).clamp(min=0)), ids)


def decode_inputs(ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, tables: RowTables,
                  sampled: torch.Tensor, block_size: int, fused: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step on the device, shape-static (CUDA-graph safe): the input ids, each token's KV slot (-1 for the
    dummy row's tokens), the sequence lengths and the rows' block tables [B, W]. `fused`: in one Triton kernel
    (asyncllm_kernels.decode_inputs), else in torch."""
    if fused:
        from asyncllm_kernels import decode_inputs as kernel

        return kernel(ids, positions, rows, tables.device, sampled, tables.dummy, block_size)
    blocks = tables.device[rows, torch.div(positions, block_size, rounding_mode="floor")]
    slots = torch.where(rows == tables.dummy, -1, blocks * block_size + positions % block_size)
    return feed_ids(ids, sampled), slots, positions + 1, tables.device.index_select(0, rows)


@dataclass
class StepInputs:
    """An eager step's model inputs."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the packed tokens whose logits are sampled
    sample_table_rows: torch.Tensor  # [S] their sequences' rows (sampling parameters)


def eager_inputs(step: Step, tables: RowTables, sampled: torch.Tensor, block_size: int) -> StepInputs:
    """A step of any shape (prefill, mixed, decode without a graph). Index arithmetic runs on the host with
    numpy where it is cheaper there (on a CPU device, small torch index ops wake the intra-op thread pool)."""
    qsl_h, pos_h = step.host_qsl, step.host_positions
    b = step.header.num_seqs
    q_lens = np.diff(qsl_h)
    seq_lens_h = pos_h[qsl_h[1:] - 1] + 1
    width = int(-(-seq_lens_h.max() // block_size)) if b else 1
    max_blocks = tables.host.shape[1]
    # flat index of each token's block in the device tables -> its KV slot
    where = np.repeat(step.host_rows, q_lens) * max_blocks + pos_h // block_size
    blocks = tables.device.view(-1).index_select(0, to_device(where, tables.device.device))
    slots = blocks * block_size + step.positions % block_size
    last = step.query_start_loc[1:] - 1
    meta = AttentionMetadata(
        query_start_loc=step.query_start_loc, seq_lens=to_device(seq_lens_h, tables.device.device),
        block_tables=tables.device[:, :width].index_select(0, step.rows), slot_mapping=slots,
        query_lens_cpu=q_lens.tolist(), seq_lens_cpu=seq_lens_h.tolist(), block_size=block_size,
        block_tables_cpu=tables.host[step.host_rows, :width])
    return StepInputs(feed_ids(step.ids, sampled), step.positions, meta, last.index_select(0, step.sample_seqs),
                      step.rows.index_select(0, step.sample_seqs))


@dataclass
class StepHandle:
    """A launched step. `wait()` blocks the calling thread (not the event loop: call it from a worker thread)
    until the step's sampled ids are on the host."""

    batch: Batch
    sampled: torch.Tensor | None  # CPU: the ids; CUDA: page-locked host buffer the device copies into
    event: torch.cuda.Event | None = None  # recorded after that copy (and the log-probabilities')
    logprobs: LogprobsOnDevice | None = None
    start: torch.cuda.Event | None = None  # recorded before the step: batch.gpu_ms is set from it

    def finished(self) -> bool:
        """The step is done on the device (never blocks): `wait` returns at once."""
        return self.event is None or self.event.query()

    def wait(self) -> tuple[list[int], StepLogprobs | None]:
        """The sampled ids, and the log-probabilities the step reports (None when it reports none)."""
        if self.event is not None:
            self.event.synchronize()
            if self.start is not None:
                self.batch.gpu_ms = self.start.elapsed_time(self.event)
        tokens = [] if self.sampled is None else self.sampled.tolist()
        return tokens, self.logprobs.read(tokens) if self.logprobs is not None else None


class HostRing:
    """Page-locked host buffers (the sampled ids; the grammar masks), reused in turn (no allocation per step). A
    buffer comes back after `size` steps; the step that used it was waited on long before (at most two are in
    flight)."""

    def __init__(self, shape: int | tuple[int, ...], dtype: torch.dtype = torch.int64, size: int = 4) -> None:
        self.buffers = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(size)]
        self.turn = itertools.cycle(self.buffers)

    def take(self, n: int) -> torch.Tensor:
        return next(self.turn)[:n]
