"""ModelRunner: turns a scheduler Batch into tensors, runs the model, samples. Owns the model and the KV cache."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from asyncllm import distributed
from asyncllm.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from asyncllm.device import resolve_device, to_device
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch
from asyncllm.errors import InvalidRequestError, OutOfMemoryError
from asyncllm.layers.attention import (
    Attention,
    AttentionBackend,
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
)
from asyncllm.layers.activation import SiluAndMul
from asyncllm.layers.norm import RMSNorm
from asyncllm.layers.sampler import Penalties, Sampler, SamplingTensors
from asyncllm.models import build_model
from asyncllm.models.loader import init_dummy, load_safetensors
from asyncllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] rows of the packed tokens whose logits are sampled
    sampling: SamplingTensors


def max_step_tokens(config: EngineConfig, device: torch.device, params_per_rank: int) -> int:
    """Tokens one step may compute (`max_num_batched_tokens`). Default on a GPU: what keeps a step's prefill
    work near 8192 tokens x 1B parameters (8192 tokens for models up to 1B parameters per GPU, down to 2048
    from 4B): a burst of new prompts is prefilled in few steps (a step that prefills runs without CUDA graphs,
    so small models gain most from fewer of them), while a step that prefills still ends soon for the running
    requests' next tokens (larger models). 2048 on CPU. Never fewer than max_num_seqs (one decode token each)."""
    if config.max_num_batched_tokens is not None:
        return config.max_num_batched_tokens
    if device.type != "cuda":
        return max(2048, config.max_num_seqs)
    scaled = 8192 * 10**9 // max(params_per_rank, 1)
    return max(min(8192, 1 << max(scaled.bit_length() - 1, 0)), 2048, config.max_num_seqs)  # a power of two


@functools.cache
def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of this process on `device`, shared by every engine made in it: cuBLAS keeps a 32 MiB
    workspace per stream it ever ran on, so a new stream per engine would leave that behind each time."""
    return torch.cuda.Stream(device)


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name != "auto":
        try:
            dtype = getattr(torch, name)
        except AttributeError:
            raise InvalidRequestError(f"unknown dtype {name!r}", "dtype") from None
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidRequestError(f"dtype must be float32, bfloat16 or float16, got {name!r}", "dtype")
        return dtype
    if device.type == "cpu":
        return torch.float32
    model_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype, None)
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def make_backend(name: str, device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    """auto: flashinfer on CUDA in bf16/fp16 when it imports and its kernels load, else triton on CUDA, else torch."""
    if name == "auto":
        if device.type != "cuda":
            return TorchAttentionBackend()
        if dtype != torch.float32 and importlib.util.find_spec("flashinfer"):
            try:
                return _flashinfer(device, dtype, attn, block_size)
            except Exception as e:  # a kernel variant missing from this flashinfer build, or no flashinfer
                log.warning("flashinfer attention unavailable (%s: %s); using the triton backend", type(e).__name__, e)
        name = "triton" if importlib.util.find_spec("triton") else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise InvalidRequestError(f"the {name} attention backend needs a CUDA device", "attention_backend")
    if name == "triton":
        return TritonAttentionBackend()
    if name == "flashinfer":
        if dtype == torch.float32:
            raise InvalidRequestError("the flashinfer backend needs bfloat16 or float16", "attention_backend")
        if not importlib.util.find_spec("flashinfer"):
            raise InvalidRequestError("flashinfer is not installed (pip install asyncllm[gpu])", "attention_backend")
        return _flashinfer(device, dtype, attn, block_size)
    raise InvalidRequestError(
        f"unknown attention backend {name!r} (available: auto, flashinfer, triton, torch)", "attention_backend")


def _flashinfer(device: torch.device, dtype: torch.dtype, attn: Attention, block_size: int) -> AttentionBackend:
    from asyncllm.layers.flashinfer_attention import FlashInferAttentionBackend, self_test

    backend = FlashInferAttentionBackend(device, dtype, attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
    self_test(backend, block_size)
    return backend


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, hf_config: Any, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.tp = distributed.init_from_env(config.tensor_parallel_size, self.device)
        if config.all_reduce != "nccl":
            self.tp.use_symmetric_memory(self.device, self.dtype, required=config.all_reduce == "symm_mem")
        torch.manual_seed(config.seed)

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = build_model(hf_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            init_dummy(self.model, config.seed)
        else:
            load_safetensors(self.model, model_dir)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = make_backend(config.attention_backend, self.device, self.dtype, self.attention_layers[0],
                                    self.block_size)
        if self.backend.name != "torch":  # GPU fast path: Triton norm and SwiGLU kernels too
            for m in self.model.modules():
                if isinstance(m, (RMSNorm, SiluAndMul)):
                    m.fused = True
        self.sampler = Sampler(self.device, config.seed)
        self.sampler.fused = self.backend.name != "torch"
        self.last_sampled: torch.Tensor | None = None  # the previous step's sampled ids, on the device
        # CUDA: every step runs on this side stream, in launch order (the loop thread never waits on it)
        self.stream = side_stream(self.device) if self.device.type == "cuda" else None
        self.graphs: CudaGraphs | None = None  # captured once the KV cache exists (after the profiling forward)
        self.closed = False

        attn = self.attention_layers[0]
        self.kv_shape = (len(self.attention_layers), 2, self.block_size, attn.num_kv_heads, attn.head_dim)
        # bytes of one block across all layers (K and V)
        self.block_bytes = self.dtype.itemsize * 2 * len(self.attention_layers) * self.block_size * attn.num_kv_heads * attn.head_dim
        self.num_blocks = self._num_kv_blocks()
        if self.tp.size > 1:  # every rank holds the same blocks: the smallest budget decides
            n = torch.tensor([self.num_blocks], dtype=torch.int64)
            dist.all_reduce(n, dist.ReduceOp.MIN, group=self.tp.host_group)
            self.num_blocks = int(n.item())
        if self.num_blocks * self.block_size < max_model_len:
            raise OutOfMemoryError(
                f"the KV cache holds {self.num_blocks} blocks x {self.block_size} = {self.num_blocks * self.block_size} "
                f"tokens, less than one request of max_model_len={max_model_len} tokens; lower max_model_len or "
                "give the cache more memory (num_kv_blocks, kv_cache_memory_bytes or gpu_memory_utilization)"
            )
        self._allocate_kv_cache(self.num_blocks)
        self.graphs = CudaGraphs(self) if self._use_graphs() else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # weights, cache, graphs are ready
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_bytes / 2**20, self.num_blocks * self.block_size)

    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name != "torch"

    # ---- KV cache -------------------------------------------------------------------------------------------
    def _allocate_kv_cache(self, num_blocks: int) -> None:
        layers, two, bs, hk, d = self.kv_shape
        # zeros, not empty: padded attention reads slots that were never written and must not see NaN
        self.kv_cache = torch.zeros(layers, two, num_blocks, bs, hk, d, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.backend = self.backend
            layer.kv_cache = self.kv_cache[i]

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes // self.block_bytes
        if self.device.type == "cpu":
            return DEFAULT_CPU_KV_CACHE_BYTES // self.block_bytes
        return self._profile_cuda_blocks()

    def _profile_cuda_blocks(self) -> int:
        """Run the largest step once with a throwaway cache, then give the rest of the memory budget to KV."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.max_step_tokens, self.max_model_len * self.config.max_num_seqs)
        seq_len = min(num_tokens, self.max_model_len)
        num_seqs = max(1, num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self._allocate_kv_cache(num_seqs * blocks_per_seq)
        batch = Batch()
        for s in range(num_seqs):
            req = Request(f"profile-{s}", [0] * seq_len, SamplingParams(temperature=0.0), 1, frozenset())
            req.block_table = list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq))
            batch.add(req, seq_len)
        self.execute(batch)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        del self.kv_cache
        kv_bytes_in_profile = num_seqs * blocks_per_seq * self.block_bytes
        # budget - memory others hold - what this process needs besides the KV cache at its peak
        available = total * self.config.gpu_memory_utilization - (total - free) - (peak - current)
        available += kv_bytes_in_profile  # the throwaway cache is freed
        torch.cuda.empty_cache()
        return max(0, int(available) // self.block_bytes)

    @functools.cached_property
    def max_step_tokens(self) -> int:
        return max_step_tokens(self.config, self.device, sum(p.numel() for p in self.model.parameters()))

    # ---- one step -------------------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> StepInputs:
        """The step's device inputs (this rank only)."""
        header, packed = self.pack(batch)
        return self.unpack(header, packed, self._sampling_tensors(batch))

    def pack(self, batch: Batch) -> tuple[StepHeader, np.ndarray]:
        """The step's host arrays in one int64 array (what followers receive), and its sizes.

        A row whose last input token is still on the device (overlap scheduling) gets it from the previous step's
        sampled ids, on the device (`batch.feed`)."""
        bs, num_seqs = self.block_size, len(batch)
        n_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.asarray(batch.starts, dtype=np.int64)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(n_new, out=qsl[1:])
        num_tokens = int(qsl[-1])
        seq_lens = starts + n_new
        tables = np.zeros((num_seqs, max(len(r.block_table) for r in batch.requests)), dtype=np.int64)
        ids = np.zeros(num_tokens, dtype=np.int64)
        feed_rows: list[int] = []
        feed_src: list[int] = []
        row = 0
        for i, (req, start, n, feed) in enumerate(zip(batch.requests, batch.starts, batch.num_new_tokens, batch.feed)):
            tables[i, : len(req.block_table)] = req.block_table
            if feed >= 0:  # the last input token was sampled by the previous step and is not on the host yet
                feed_rows.append(row + n - 1)
                feed_src.append(feed)
                n -= 1
            ids[row : row + n] = req.token_ids[start : start + n]
            row += n + (feed >= 0)
        positions = np.repeat(starts - qsl[:-1], n_new) + np.arange(num_tokens)
        slots = tables[np.repeat(np.arange(num_seqs), n_new), positions // bs] * bs + positions % bs
        sample_rows = qsl[1:][np.asarray(batch.sample, dtype=bool)] - 1
        parts = (ids, positions, slots, qsl, seq_lens, sample_rows, np.asarray(feed_rows, np.int64),
                 np.asarray(feed_src, np.int64), tables.reshape(-1))
        header = StepHeader(num_seqs, num_tokens, len(sample_rows), len(feed_rows), tables.shape[1])
        return header, np.concatenate(parts)

    def unpack(self, header: StepHeader, packed: np.ndarray, sampling: SamplingTensors | None) -> StepInputs:
        """The packed host array of a step (built here or received from rank 0) -> device tensors. Every rank
        derives its inputs from the same array, so they cannot diverge."""
        b, t, w = header.num_seqs, header.num_tokens, header.table_width
        sizes = [t, t, t, b + 1, b, header.num_sampled, header.num_feed, header.num_feed, b * w]
        (ids_d, pos_d, slots_d, qsl_d, lens_d, sample_d, feed_rows_d, feed_src_d, tables_d) = to_device(
            packed, self.device).split(sizes)
        host = np.split(packed, np.cumsum(sizes)[:-1])
        qsl, lens, tables = host[3], host[4], host[8].reshape(b, w)
        if header.num_feed:
            assert self.last_sampled is not None, "a pending token without a previous step"
            ids_d[feed_rows_d] = self.last_sampled[feed_src_d]
        meta = AttentionMetadata(
            query_start_loc=qsl_d, seq_lens=lens_d, block_tables=tables_d.view(b, w), slot_mapping=slots_d,
            query_lens_cpu=np.diff(qsl).tolist(), seq_lens_cpu=lens.tolist(), block_size=self.block_size,
            block_tables_cpu=tables)
        return StepInputs(ids_d, pos_d, meta, sample_d, sampling)

    def _sampling_tensors(self, batch: Batch) -> SamplingTensors:
        """Sampling parameters of the rows that sample, in row order."""
        rows = [(r, f) for r, s, f in zip(batch.requests, batch.sample, batch.feed) if s]
        reqs = [r for r, _ in rows]
        params = [r.params for r in reqs]
        seeded: list[tuple[int, torch.Generator]] = []
        for row, req in enumerate(reqs):
            if req.params.seed is not None and not req.params.greedy:
                if req.generator is None:
                    req.generator = torch.Generator(device=self.device).manual_seed(req.params.seed)
                seeded.append((row, req.generator))
        temps = [0.0 if p.greedy else p.temperature for p in params]
        all_greedy = all(t == 0.0 for t in temps)
        penalized = [row for row, p in enumerate(params) if p.has_penalties]
        if all_greedy:  # argmax only: no per-row parameters to copy
            floats, top_k = torch.empty(3, 0, device=self.device), torch.empty(0, dtype=torch.int64, device=self.device)
        else:
            floats = to_device([temps, [p.top_p for p in params], [p.min_p for p in params]], self.device, torch.float32)
            top_k = to_device([p.top_k for p in params], self.device)
        return SamplingTensors(
            temperature=floats[0], top_p=floats[1], min_p=floats[2], top_k=top_k,
            seeded=seeded,
            all_greedy=all_greedy,
            need_sort=any(p.top_k > 0 or p.top_p < 1.0 for p in params),
            need_min_p=any(p.min_p > 0.0 for p in params),
            penalties=self._penalties([rows[r] for r in penalized], penalized) if penalized else None,
        )

    def _penalties(self, penalized: list[tuple[Request, int]], rows: list[int]) -> Penalties:
        """Token counts of the penalized requests (work proportional to their lengths, once per step). A token
        still on the device (overlap scheduling) is counted on the device."""
        reqs = [r for r, _ in penalized]
        vocab = self.model.config.vocab_size
        counts = torch.zeros(len(reqs), vocab, dtype=torch.float32)
        seen = torch.zeros(len(reqs), vocab, dtype=torch.bool)
        for i, r in enumerate(reqs):
            out = torch.tensor(r.output_token_ids, dtype=torch.int64)
            counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, torch.tensor(r.token_ids, dtype=torch.int64)] = True
        dev = self.device
        counts, seen = to_device(counts, dev, torch.float32), to_device(seen, dev, torch.bool)
        pending = [(i, feed) for i, (_, feed) in enumerate(penalized) if feed >= 0]
        if pending:
            assert self.last_sampled is not None
            idx = to_device(pending, dev)
            token = self.last_sampled[idx[:, 1]]
            counts.index_put_((idx[:, 0], token), torch.ones(len(pending), device=dev), accumulate=True)
            seen[idx[:, 0], token] = True
        per_row = to_device([[r.params.presence_penalty for r in reqs], [r.params.frequency_penalty for r in reqs],
                             [r.params.repetition_penalty for r in reqs]], dev, torch.float32)
        return Penalties(rows=to_device(rows, dev), output_counts=counts, seen=seen,
                         presence=per_row[0], frequency=per_row[1], repetition=per_row[2])

    @torch.inference_mode()
    def launch(self, batch: Batch, broadcast: bool = True) -> StepHandle:
        """Queue one step on the runner's stream and return at once (CUDA); the handle yields the sampled
        tokens (one per row with batch.sample set, in row order). With tensor parallelism (rank 0) the step is
        first sent to the followers, and the sampled ids after it (they feed the next step on every rank)."""
        if self.closed:
            raise RuntimeError("this engine was closed")
        to_followers = broadcast and self.tp.size > 1
        with self._on_stream():
            header, packed = self.pack(batch)
            if to_followers:
                if self.tp.steps is None:
                    raise RuntimeError("this tensor-parallel engine was shut down")
                self.tp.steps.send(header.encode(packed))
            inputs = self.unpack(header, packed, self._sampling_tensors(batch))
            hidden = self._forward(inputs)
            if inputs.sample_rows.numel() == 0:
                return StepHandle(batch, None, None)
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            assert inputs.sampling is not None
            sampled = self.sampler(logits, inputs.sampling)
            if to_followers:
                dist.broadcast(sampled, 0, group=self.tp.device_group)
            self.last_sampled = sampled
            if self.stream is None:
                return StepHandle(batch, sampled, None)
            host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
            host.copy_(sampled, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
            return StepHandle(batch, host, event)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(inputs):
            return self.graphs.replay(inputs)
        self.backend.plan(inputs.meta)
        return self.model(inputs.input_ids, inputs.positions)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..N-1: run every step rank 0 sends (same forward, same graphs, same collectives) until it says
        stop. Rank 0 samples; followers take its sampled ids for the next step's feed."""
        assert self.tp.steps is not None
        while (step := StepHeader.decode(self.tp.steps.recv())) is not None:
            header, packed = step
            with self._on_stream():
                inputs = self.unpack(header, packed, None)
                hidden = self._forward(inputs)
                if header.num_sampled:
                    self.model.compute_logits(hidden[inputs.sample_rows])  # its all-gather is a collective
                    sampled = torch.empty(header.num_sampled, dtype=torch.int64, device=self.device)
                    dist.broadcast(sampled, 0, group=self.tp.device_group)
                    self.last_sampled = sampled
        log.info("rank %d: rank 0 ended the job", self.tp.rank)
        self.close()

    def stop_followers(self) -> None:
        """Rank 0: tell the followers to stop, then leave the process group with them."""
        if self.tp.is_leader and self.tp.steps is not None:
            self.tp.steps.send(StepHeader.STOP)
            self.close()

    def close(self) -> None:
        """Release the CUDA graphs (their collectives pin the NCCL communicator), leave the process group, and
        drop the KV cache and the weights: device memory goes back at once. Idempotent; no step runs after."""
        if self.closed:
            return
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        if self.tp.size > 1:
            distributed.shutdown()
        for layer in self.attention_layers:
            layer.kv_cache = None
        self.kv_cache = self.model = self.backend = self.last_sampled = None  # type: ignore[assignment]
        self.attention_layers = []
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, batch: Batch) -> list[int]:
        """Run one step to completion on this rank alone (blocks on the GPU); every rank calls it alike at start-up."""
        return self.launch(batch, broadcast=False).wait()

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


@dataclass
class StepHeader:
    """Sizes of one step's packed host array; rank 0 sends [1, sizes..., packed...] to the followers, [0] to stop."""

    num_seqs: int
    num_tokens: int
    num_sampled: int
    num_feed: int
    table_width: int

    STOP: ClassVar[np.ndarray] = np.zeros(1, dtype=np.int64)

    def encode(self, packed: np.ndarray) -> np.ndarray:
        sizes = [1, self.num_seqs, self.num_tokens, self.num_sampled, self.num_feed, self.table_width]
        return np.concatenate([np.asarray(sizes, dtype=np.int64), packed])

    @staticmethod
    def decode(msg: np.ndarray) -> tuple[StepHeader, np.ndarray] | None:
        if msg[0] == 0:
            return None
        return StepHeader(*(int(x) for x in msg[1:6])), msg[6:]


@dataclass
class StepHandle:
    """A launched step. `wait()` blocks the calling thread (not the event loop: call it from a worker thread)
    until the step's sampled ids are on the host."""

    batch: Batch
    sampled: torch.Tensor | None  # CPU: the ids; CUDA: page-locked host buffer the device copies into
    event: Any = None  # torch.cuda.Event recorded after that copy

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return [] if self.sampled is None else self.sampled.tolist()


class CudaGraphs:
    """Decode steps replayed from CUDA graphs, one per padded batch size, sharing one memory pool.

    Inputs live in static buffers; a step copies its tensors in (device to device) and pads the rest: padded rows
    have slot -1 (the KV-store kernel skips them) and seq_len 1. The paged decode kernel's grid is fixed by
    max_model_len. Logits and sampling run outside the graph (their shapes and parameters vary per step).
    """

    def __init__(self, runner: ModelRunner) -> None:
        # no reference back to the runner: a runner <-> graphs cycle would keep the GPU memory until a gc pass
        cfg = runner.config
        self.model, self.backend, self.device = runner.model, runner.backend, runner.device
        self.block_size, self.max_model_len = runner.block_size, runner.max_model_len
        self.max_bs = min(cfg.cuda_graph_max_bs or 256, cfg.max_num_seqs)
        self.sizes = sorted({s for s in (1, 2, 4, 8, *range(16, self.max_bs + 1, 16)) if s <= self.max_bs} | {self.max_bs})
        dev, i64 = runner.device, torch.int64
        width = -(-runner.max_model_len // runner.block_size)
        self.ids = torch.zeros(self.max_bs, dtype=i64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=i64, device=dev)
        self.slots = torch.full((self.max_bs,), -1, dtype=i64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=i64, device=dev)
        self.tables = torch.zeros(self.max_bs, width, dtype=i64, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup = runner.stream or torch.cuda.Stream(dev)
        with torch.inference_mode():
            for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
                self._capture(bs)
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=torch.arange(bs + 1, device=self.device), seq_lens=self.seq_lens[:bs],
            block_tables=self.tables[:bs], slot_mapping=self.slots[:bs], query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_model_len] * bs, block_size=self.block_size,
            block_tables_cpu=np.zeros(tuple(self.tables[:bs].shape), dtype=np.int64))

    def _capture(self, bs: int) -> None:
        self.backend.plan_graph(bs, self._meta(bs), capture=True)
        # warm-up (compiles the Triton kernels) off the capture, on one stream for all sizes: cuBLAS keeps a
        # workspace per stream it ever ran on (32 MiB on Hopper) for the life of the process
        self.warmup.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.warmup):
            self.model(self.ids[:bs], self.positions[:bs])
        torch.cuda.current_stream().wait_stream(self.warmup)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(self.ids[:bs], self.positions[:bs])
        self.graphs[bs] = (graph, hidden)

    def release(self) -> None:
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        torch.cuda.synchronize(self.device)

    def fits(self, inputs: StepInputs) -> bool:
        meta = inputs.meta
        return max(meta.query_lens_cpu) == 1 and meta.num_seqs <= self.max_bs

    def replay(self, inputs: StepInputs) -> torch.Tensor:
        n = inputs.meta.num_seqs
        bs = next(s for s in self.sizes if s >= n)
        meta = inputs.meta
        self.ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if bs > n:
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.backend.plan_graph(bs, meta, capture=False)
        graph, hidden = self.graphs[bs]
        graph.replay()
        return hidden[:n]
