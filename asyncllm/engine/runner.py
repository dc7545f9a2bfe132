"""ModelRunner: runs a scheduler Batch on this rank (model, KV cache, sampling). Step inputs: step_inputs.py;
CUDA graphs: cuda_graphs.py."""
from __future__ import annotations

import contextlib
import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from asyncllm import distributed
from asyncllm.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from asyncllm.device import resolve_device
from asyncllm.engine.cuda_graphs import CudaGraphs, graph_size
from asyncllm.engine.grammar import HostMasks, MaskFill, TokenMask
from asyncllm.engine.logit_adjust import step_logit_bias, step_penalties
from asyncllm.engine.logprobs import PROMPT_SLICE, LogprobPlan, LogprobsOnDevice, plan_logprobs
from asyncllm.engine.piecewise_graphs import PiecewiseGraphs, default_max_tokens
from asyncllm.engine.request import Request
from asyncllm.engine.scheduler import Batch
from asyncllm.engine.step_inputs import (
    PACKED_STAGING,
    HostRing,
    RowTables,
    StepHandle,
    StepHeader,
    StepInputs,
    eager_inputs,
    pack,
    unpack,
)
from asyncllm.errors import InvalidRequestError, OutOfMemoryError
from asyncllm.layers.attention import Attention
from asyncllm.layers.attention_backends import fast_path, make_backend
from asyncllm.layers import kernel_choice
from asyncllm.layers.kernel_choice import KernelChoice
from asyncllm.layers.sampler import LogitBias, Penalties, PenaltyCounts, Sampler
from asyncllm.models import build_model
from asyncllm.models.loader import init_dummy, load_safetensors
from asyncllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def max_step_tokens(config: EngineConfig, device: torch.device, params_per_rank: int) -> int:
    """Tokens one step may compute (`max_num_batched_tokens`). Default on a GPU: what keeps a step's prefill
    work near 8192 tokens x 1B parameters (8192 tokens for models up to 1B parameters per GPU, down to 2048
    from 4B): a burst of new prompts is prefilled in few steps (a step that prefills costs the host more than a
    decode step, so small models gain most from fewer of them), while a step that prefills still ends soon for the
    running requests' next tokens (larger models). 2048 on CPU. Never fewer than max_num_seqs (one decode token each)."""
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


def dependent_launch_supported(device: torch.device) -> bool:
    """The fast path's Triton kernels can launch with programmatic dependent launch on `device` (Triton installed)."""
    from asyncllm_kernels.dependent_launch import supported

    return supported(device)


@dataclass
class Forward:
    """A step's forward, launched: the logits of the rows that sample (None: no row samples) and, eager, their
    sampler rows and the positions of the tokens they sample."""

    header: StepHeader
    logits: torch.Tensor | None
    table_rows: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass
class Deferred:
    """Rank 0: a step whose forward is queued and whose sampling is not (yet)."""

    batch: Batch
    forward: Forward
    adjust: list[Penalties | LogitBias | TokenMask]
    logprobs: LogprobsOnDevice | None
    to_followers: bool
    start: torch.cuda.Event | None  # recorded on the runner's stream before the step (CUDA): its GPU time
    # the grammar-constrained rows that sample: their rows among the step's sampled logits, and their requests
    mask_rows: list[int] = field(default_factory=list)
    constrained: list[Request] = field(default_factory=list)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, hf_config: Any, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.tp = distributed.init_from_env(config.tensor_parallel_size, self.device, config.step_transport)
        if config.all_reduce != "nccl":
            self.tp.use_symmetric_memory(self.device, self.dtype, required=config.all_reduce == "symm_mem")
        torch.manual_seed(config.seed)

        # GPU fast path (any attention backend but torch's): the layers' Triton kernels, chosen as they are built
        fast = fast_path(config.attention_backend, self.device)
        kernels = KernelChoice(fused=fast, skinny_matmul=fast and config.small_matmul == "triton",
                               pdl=fast and config.dependent_launch and dependent_launch_supported(self.device))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), kernel_choice.choose(kernels):
                self.model = build_model(hf_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            init_dummy(self.model, config.seed)
        else:
            load_safetensors(self.model, model_dir)
        self.model.eval()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        with kernel_choice.choose(kernels):
            self.backend = make_backend(config.attention_backend, self.device, self.dtype, self.attention_layers[0],
                                        self.block_size)
        assert (self.backend.name != "torch") == fast, "fast_path disagrees with make_backend"
        # per-row state on the device (rows: the scheduler's slots of running requests, + one dummy row)
        self.tables = RowTables(config.max_num_seqs, -(-max_model_len // self.block_size), self.device)
        self.sampler = Sampler(config.max_num_seqs, self.device, fused=fast)
        # repetition penalties' token counts (rank 0 samples), allocated before the KV cache is sized
        self.penalty_counts = PenaltyCounts(config.max_num_seqs + 1, hf_config.vocab_size, self.device) \
            if self.tp.is_leader else None
        self.seed_rng = random.Random(config.seed)  # seeds of requests that bring none
        # the last step's sampled ids (rows [0, num_sampled)): the next step's pending inputs come from here
        self.sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        self.host_ring = HostRing(config.max_num_seqs) if self.device.type == "cuda" else None
        # packed steps on their way to the device (a follower's host runs at most ~3 steps ahead of its GPU)
        self.staging = HostRing(PACKED_STAGING, size=8) if self.device.type == "cuda" else None
        self.mask_width = -(-hf_config.vocab_size // 32)  # int32 words of a grammar bitmask row
        # CUDA: every step runs on this side stream, in launch order (the loop thread never waits on it)
        self.stream = side_stream(self.device) if self.device.type == "cuda" else None
        # steps timed on the GPU (Batch.gpu_ms) and the largest decode graph at start-up: for the prompt-token limit
        self.timed = self.stream is not None and config.max_step_slowdown > 0
        # captured once the KV cache exists (after the profiling forward): decode steps, steps with prompt tokens
        self.graphs: CudaGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None
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
        if self._use_graphs():
            self.graphs = self._capture_graphs()
            self.pieces = self._capture_pieces()
        if self.device.type == "cuda" and self.tp.is_leader:  # compile the grammar-mask kernel now, not mid-serving
            TokenMask.warm_up(torch.zeros(1, hf_config.vocab_size, dtype=self.dtype, device=self.device))
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # weights, cache, graphs are ready
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens)", self.num_blocks, self.block_size,
                 self.num_blocks * self.block_bytes / 2**20, self.num_blocks * self.block_size)

    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name != "torch"

    def _capture_graphs(self) -> CudaGraphs:
        max_bs = min(self.config.cuda_graph_max_bs or 256, self.config.max_num_seqs)
        assert self.stream is not None
        return CudaGraphs(self.model, self.backend, self.sampler, self.tables, self.sampled, max_bs, self.block_size,
                          self.max_model_len, self.stream, self.timed)

    def _capture_pieces(self) -> PiecewiseGraphs | None:
        limit = self.config.cuda_graph_max_tokens
        if limit is None:
            limit = default_max_tokens(self.max_step_tokens, self.params_per_rank, self.tp.size)
        if limit == 0:
            return None
        assert self.stream is not None
        backend: Any = self.backend  # a GPU backend (graphs are on): it has `attend`
        return PiecewiseGraphs(self.model, backend, self.attention_layers, limit, self.stream, self.timed)

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
            req.row = s
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
    def params_per_rank(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @functools.cached_property
    def max_step_tokens(self) -> int:
        return max_step_tokens(self.config, self.device, self.params_per_rank)

    # ---- one step -------------------------------------------------------------------------------------------
    def prepare(self, batch: Batch) -> StepInputs:
        """An eager step's device inputs (this rank only; tests and the serving benchmark's stand-in)."""
        header, packed = pack(batch, 0, self.tables.dummy, self.seed_rng, ())
        step = unpack(header, packed, self.tables, self.device)
        if header.num_new_rows:
            self.sampler.set_rows(step.new_rows)
        return eager_inputs(step, self.tables, self.sampled, self.block_size)

    def _extras(self, batch: Batch) -> tuple[list[Penalties | LogitBias], LogprobPlan | None, list[int], list[Request]]:
        """Rank 0: the step's logit adjustments but grammar masks (applied in place before sampling), what it
        reports of log-probabilities, and its rows that sample under a grammar (their rows among the sampled
        logits, their requests), from the rows whose request asks for more than the sampler's parameters."""
        rows = batch.extras
        if not rows:
            return [], None, [], []
        reqs, sample = batch.requests, batch.sample
        # row -> its row among the step's sampled logits (a decode step's rows all sample)
        sample_index = np.arange(len(sample)) if all(sample) else np.cumsum(sample) - 1
        penalized = [i for i in rows if reqs[i].penalized]
        biased = [i for i in rows if reqs[i].biased]
        adjust = [r for r in (step_penalties(batch, penalized, sample_index, self.penalty_counts, self.device)
                              if penalized else None,
                              step_logit_bias(batch, biased, sample_index, self.device) if biased else None) if r]
        reporting = [i for i in rows if reqs[i].reports_logprobs]
        constrained = [i for i in rows if sample[i] and reqs[i].grammar is not None]
        return (adjust, plan_logprobs(batch, reporting) if reporting else None,
                [int(sample_index[i]) for i in constrained], [reqs[i] for i in constrained])

    @functools.cached_property
    def _mask_rings(self) -> tuple[HostRing, HostRing] | None:
        """Page-locked buffers of the grammar masks (CUDA): their rows among the sampled logits, and the bitmasks."""
        if self.device.type != "cuda":
            return None
        n = self.config.max_num_seqs
        return HostRing(n, torch.int64), HostRing((n, self.mask_width), torch.int32)

    @torch.inference_mode()  # as when the rings were made: their buffers are inference tensors
    def mask_job(self, step: Deferred) -> MaskFill:
        """The step's grammar masks on the host: the buffers are made here; the job's `run` fills them (the
        grammars must hold every earlier token) without the GIL until it returns."""
        reqs = step.constrained
        if self._mask_rings is None:
            return MaskFill(reqs, self.model.config.vocab_size, torch.tensor(step.mask_rows, dtype=torch.int64))
        rows_ring, masks_ring = self._mask_rings
        rows = rows_ring.take(len(reqs))
        rows.numpy()[:] = step.mask_rows
        return MaskFill(reqs, self.model.config.vocab_size, rows, masks_ring.take(len(reqs)))

    @torch.inference_mode()
    def launch(self, batch: Batch, broadcast: bool = True, defer: bool = False) -> StepHandle | Deferred:
        """Queue one step on the runner's stream and return at once (CUDA); the handle yields the sampled
        tokens (one per row with batch.sample set, in row order) and the log-probabilities asked for. With tensor
        parallelism (rank 0) the step is first sent to the followers, and the sampled ids after it (they feed the
        next step on every rank). `defer`: queue the forward only and return the Deferred step; `complete` queues
        its sampling once `mask_job` made its grammar masks (after the constrained rows' previous tokens
        advanced their matchers)."""
        if self.closed:
            raise RuntimeError("this engine was closed")
        to_followers = broadcast and self.tp.size > 1
        with self._on_stream():  # every copy to the device below is ordered before the step that reads it
            start = self._event() if self.timed else None
            adjust, plan, mask_rows, constrained = self._extras(batch)
            # a graph step has no hidden states of prompt tokens to report
            pad = graph_size(self.graphs.sizes, batch) if self.graphs is not None and not (plan and plan.prompt_tokens) else 0
            header, packed = pack(batch, pad, self.tables.dummy, self.seed_rng, plan.prompt_tokens if plan else ())
            if to_followers:
                if self.tp.steps is None:
                    raise RuntimeError("this tensor-parallel engine was shut down")
                self.tp.steps.send(header.encode(packed))
            logprobs = LogprobsOnDevice(plan, self.device) if plan else None
            fwd = self._forward(header, packed, logprobs)
            step = Deferred(batch, fwd, adjust, logprobs, to_followers, start, mask_rows, constrained)
            if defer:
                return step
            return self._finish(step, self.mask_job(step).run() if constrained else None)

    @torch.inference_mode()
    def complete(self, step: Deferred, masks: HostMasks | None) -> StepHandle:
        """Queue the sampling of a deferred step, under its grammar masks (from `mask_job`; behind a closed
        `StreamGate`, filled once the gate opens)."""
        with self._on_stream():
            return self._finish(step, masks)

    def _finish(self, step: Deferred, masks: HostMasks | None) -> StepHandle:
        """Rank 0: sample a launched step, send the ids to the followers, start the read-back."""
        if masks is not None and step.forward.logits is not None:
            step.adjust.append(masks.to(self.device))
        n = self._sample(step.forward, step.adjust, step.logprobs)
        if step.to_followers and n:
            dist.broadcast(self.sampled[:n], 0, group=self.tp.device_group)
        if step.logprobs is not None:
            step.logprobs.to_host()
        host = None
        if n and self.host_ring is None:
            host = self.sampled[:n].clone()
        elif n:
            host = self.host_ring.take(n)
            host.copy_(self.sampled[:n], non_blocking=True)
        event = self._event() if n or step.logprobs is not None else None
        return StepHandle(step.batch, host, event, step.logprobs, step.start)

    def _event(self) -> torch.cuda.Event | None:
        """An event recorded on the runner's stream now (None without CUDA). Blocking: the step thread sleeps in
        wait() instead of spinning a core for the whole GPU step (CUDA spins by default); the wake-up is hidden by
        overlap, the next step being queued before the wait. Timed when the scheduler's prompt-token limit is on: it
        is learned from the steps' GPU times (engine/step_costs.py)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event(enable_timing=self.timed, blocking=True)
        event.record(self.stream)
        return event

    def _forward(self, header: StepHeader, packed: Any, logprobs: LogprobsOnDevice | None) -> Forward:
        """Every rank: unpack the step and run the model up to the logits of the rows that sample (rank 0 also
        computes the prompt log-probabilities asked for)."""
        step = unpack(header, packed, self.tables, self.device, self.staging)
        if header.num_new_rows:
            self.sampler.set_rows(step.new_rows)
        if header.graph:
            assert self.graphs is not None
            return Forward(header, self.graphs.forward(step))
        inputs = eager_inputs(step, self.tables, self.sampled, self.block_size)
        self.backend.plan(inputs.meta)
        if self.pieces is not None and self.pieces.fits(header.num_tokens):
            hidden = self.pieces.forward(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions)
        self._prompt_logprobs(hidden, step.prompt_lp, logprobs)
        if header.num_sampled == 0:
            return Forward(header, None)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])  # all-gather: a collective on every rank
        return Forward(header, logits, inputs.sample_table_rows, inputs.positions[inputs.sample_rows] + 1)

    def _sample(self, fwd: Forward, adjust: list[Penalties | LogitBias | TokenMask],
                logprobs: LogprobsOnDevice | None) -> int:
        """Rank 0: apply the logit adjustments, sample into `self.sampled`, keep the log-probabilities asked for
        (of the logits before the adjustments). Returns the number of sampled rows."""
        logits, header = fwd.logits, fwd.header
        if logits is None:
            return 0
        n = header.num_sampled
        if logprobs is not None:
            logprobs.keep_raw(logits)
        for a in adjust:
            a.apply(logits)
        if header.graph:
            assert self.graphs is not None
            self.graphs.sample(header.num_seqs)
        else:
            self.sampler(logits, fwd.table_rows, fwd.positions, out=self.sampled[:n])
        for a in adjust:
            if isinstance(a, Penalties):
                a.record(self.sampled)
        if logprobs is not None:
            logprobs.sampled_ids(self.sampled[:n])
        return n

    def _prompt_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, logprobs: LogprobsOnDevice | None) -> None:
        """Every rank (the logits are a collective): the logits of the step's prompt-logprob tokens, in slices;
        rank 0 keeps their log-probabilities."""
        for start in range(0, len(tokens), PROMPT_SLICE):
            logits = self.model.compute_logits(hidden[tokens[start : start + PROMPT_SLICE]])
            if logprobs is not None:
                logprobs.prompt_slice(start, logits)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks 1..N-1: run every step rank 0 sends (same forward, same graphs, same collectives) until it says
        stop. Rank 0 samples; followers take its sampled ids for the next step's feed."""
        assert self.tp.steps is not None
        while (step := StepHeader.decode(self.tp.steps.recv())) is not None:
            header, packed = step
            with self._on_stream():
                num_sampled = header.num_sampled if self._forward(header, packed, None).logits is not None else 0
                if num_sampled:
                    dist.broadcast(self.sampled[:num_sampled], 0, group=self.tp.device_group)
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
        for graphs in (self.graphs, self.pieces):
            if graphs is not None:
                graphs.release()
        self.graphs = self.pieces = None
        if self.tp.size > 1:
            distributed.shutdown()
        for layer in self.attention_layers:
            layer.kv_cache = None
        self.kv_cache = self.model = self.backend = self.sampled = None  # type: ignore[assignment]
        self.attention_layers = []
        self.closed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def execute(self, batch: Batch) -> list[int]:
        """Run one step to completion on this rank alone (blocks on the GPU); every rank calls it alike at start-up.
        Returns the sampled ids."""
        return self.launch(batch, broadcast=False).wait()[0]

    def _on_stream(self) -> Any:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
