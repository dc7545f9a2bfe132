"""Tensor-parallel process group: torchrun's environment -> one group of all ranks (world size = TP size).

Rank 0 runs the engine (scheduler, sampling, HTTP); ranks 1..N-1 are followers that run the same forward on
their shard. Collectives between shards (all-reduce, all-gather) use the device backend (NCCL on CUDA, gloo on
CPU). Each step's inputs go from rank 0 to the followers (they need them on the host to plan attention) by one of
two transports (`step_transport`): on one host a shared-memory ring (`step_channel`: a step never waits on a
device-to-host copy or a socket), across hosts torch.distributed broadcasts in a group of their own
(`step_broadcast`). A gloo group on the host carries the rare start-up and shutdown messages.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from asyncllm.errors import InvalidRequestError
from asyncllm.step_broadcast import StepBroadcast
from asyncllm.step_channel import StepChannel

log = logging.getLogger(__name__)

# A dead peer must end the job within seconds, not hang it: every collective has this deadline (seconds), and so
# has the shutdown of the process group.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("ASYNCLLM_COLLECTIVE_TIMEOUT_S", "60"))
# Broadcast steps (ranks maybe on several hosts): every rank bumps a counter in torchrun's store this often (s); a
# peer whose counter stands still for PEER_DEAD_S seconds is dead, and this rank ends the job naming it.
HEARTBEAT_S = 0.5
PEER_DEAD_S = float(os.environ.get("ASYNCLLM_PEER_DEAD_S", "10"))
# all_reduce="symm_mem": inputs up to this size (bytes) take the one-shot kernel (a decode step of up to 128 rows
# of a 4096-wide bf16 model), larger ones NCCL
SYMM_MEM_ALL_REDUCE_BYTES = 1 << 20


@dataclass
class TPGroup:
    rank: int
    size: int
    device_group: dist.ProcessGroup | None  # shards' collectives
    host_group: dist.ProcessGroup | None  # start-up and shutdown messages (gloo)
    steps: StepChannel | StepBroadcast | None = None  # rank 0 -> followers, every step's inputs
    small_all_reduce: SymmetricMemoryAllReduce | None = None  # opt-in (all_reduce="symm_mem") for small inputs
    heartbeat: Heartbeat | None = None  # broadcast steps: peers watched through torchrun's store

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place with NCCL; a new tensor on the symmetric-memory path: use the result)."""
        if self.size == 1:
            return x
        if self.small_all_reduce is not None and self.small_all_reduce.fits(x):
            return self.small_all_reduce(x)
        dist.all_reduce(x, group=self.device_group)
        return x

    def use_symmetric_memory(self, device: torch.device, dtype: torch.dtype, required: bool) -> None:
        """Small all-reduces by one-shot kernels over NVLink instead of NCCL's (SymmetricMemoryAllReduce). Not
        `required` (all_reduce="auto"): NCCL where that cannot be set up (CPU, no peer access, an older torch).
        Collective: every rank calls it, before the CUDA graphs are captured."""
        if self.size == 1 or self.small_all_reduce is not None:
            return
        if device.type != "cuda":
            if required:
                raise InvalidRequestError("all_reduce='symm_mem' needs CUDA GPUs", "all_reduce")
            return
        assert self.device_group is not None
        try:
            self.small_all_reduce = SymmetricMemoryAllReduce(self.device_group, device, dtype,
                                                             SYMM_MEM_ALL_REDUCE_BYTES)
        except Exception as e:  # set-up fails alike on every rank (same host, same build)
            if required:
                raise
            log.warning("rank %d: symmetric-memory all-reduce unavailable (%s); using NCCL only", self.rank, e)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)


class SymmetricMemoryAllReduce:
    """Small all-reduces (decode steps) over NVLink instead of NCCL, from buffers every peer can read (torch
    symmetric memory): a plain all-reduce by torch's one-shot kernel, and the all-reduce that feeds a residual add +
    RMSNorm fused with them into one Triton kernel (asyncllm_kernels.all_reduce_add_rms_norm). Inputs of more than
    `max_bytes` or of another dtype go to NCCL. Captured in CUDA graphs like any kernel."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from asyncllm_kernels import MAX_ALL_REDUCE_PROGRAMS

        self.group_name, self.dtype, self.max_bytes = group.group_name, dtype, max_bytes
        self.rank, world = group.rank(), group.size()
        with contextlib.suppress(AttributeError):  # older torch needs the group enabled; newer drops the call
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank maps every peer's buffer
        # the fused kernel's two exchange slots of `world` parts each and its flags, by address on every rank
        self.part = max_bytes // dtype.itemsize
        self.exchange = symm_mem.empty(2 * world * self.part, dtype=dtype, device=device)
        self.signals = symm_mem.empty(MAX_ALL_REDUCE_PROGRAMS * world, dtype=torch.int32, device=device).zero_()
        self.exchange_ptrs = torch.tensor(symm_mem.rendezvous(self.exchange, self.group_name).buffer_ptrs,
                                          dtype=torch.int64, device=device)
        self.signal_ptrs = torch.tensor(symm_mem.rendezvous(self.signals, self.group_name).buffer_ptrs,
                                        dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every pad is zeroed before any rank raises a flag in it

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() * x.element_size() <= self.max_bytes and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel()]
        staged.copy_(x.view(-1))
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out=out.view(-1))
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int) -> torch.Tensor:
        """norm(all-reduced x + residual) * weight, residual updated in place; x [T, H] must `fit`. Two calls in a
        row on the stream must pass different slots (0, 1): see asyncllm_kernels.allreduce_norm."""
        from asyncllm_kernels import all_reduce_add_rms_norm

        return all_reduce_add_rms_norm(x, residual, weight, eps, self.exchange_ptrs, self.signal_ptrs,
                                       slot * self.exchange_ptrs.numel() * self.part, self.part, self.rank)


SINGLE = TPGroup(0, 1, None, None)
_current = SINGLE


def current() -> TPGroup:
    """The group the model being built belongs to (TP 1 unless `init_from_env` ran)."""
    return _current


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(tensor_parallel_size: int | None, device: torch.device, step_transport: str = "auto") -> TPGroup:
    """Join torchrun's job (TP size = WORLD_SIZE; `tensor_parallel_size` must agree or be None/1 meaning 'auto').
    `step_transport`: shm (one host), broadcast, or auto (shm when every rank is on rank 0's x86-64 host)."""
    global _current
    if not launched_by_torchrun():
        if tensor_parallel_size not in (None, 1):
            raise InvalidRequestError(
                f"tensor_parallel_size={tensor_parallel_size} needs a torchrun launch "
                f"(torchrun --nproc-per-node {tensor_parallel_size} -m asyncllm.serve ...)", "tensor_parallel_size")
        _current = SINGLE
        return SINGLE
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if tensor_parallel_size not in (None, 1, world):
        raise InvalidRequestError(
            f"tensor_parallel_size={tensor_parallel_size} but torchrun started {world} processes", "tensor_parallel_size")
    if step_transport not in ("auto", "shm", "broadcast"):
        raise InvalidRequestError(f"step_transport must be auto, shm or broadcast, got {step_transport!r}",
                                  "step_transport")
    if _current.size == world:
        return _current  # already joined (a second engine in the same process)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    host = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
    one_host = _on_one_host(host, world)
    if step_transport == "shm" and not one_host:
        raise InvalidRequestError("step_transport=shm needs every rank on one host; these ranks span several: use "
                                  "broadcast (or auto)", "step_transport")
    ring_safe = platform.machine().lower() in ("x86_64", "amd64")  # the ring relies on x86-64's store order
    if step_transport == "auto":
        step_transport = "shm" if one_host and ring_safe else "broadcast"
    elif step_transport == "shm" and not ring_safe:
        log.warning("step_transport=shm on %s: the ring relies on x86-64's store order", platform.machine())
    if step_transport == "shm":
        steps: StepChannel | StepBroadcast = _open_step_channel(rank, world, host)
    else:  # a group of its own: followers post their next receive ahead of the shards' collectives
        steps = StepBroadcast(dist.new_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout),
                              device)
    log.info("rank %d of %d: steps by %s", rank, world, step_transport)
    # one host: torchrun's agent sees a dead worker and ends the job; across hosts no agent sees the others'
    heartbeat = Heartbeat(rank, world) if step_transport == "broadcast" else None
    _current = TPGroup(rank, world, dist.group.WORLD, host, steps, heartbeat=heartbeat)
    if device.type == "cuda":  # create the NCCL communicator now, eagerly, never during a CUDA-graph capture
        _current.all_reduce(torch.ones(1, device=device))
        torch.cuda.synchronize(device)
    return _current


class Heartbeat:
    """Liveness across hosts, where a pid means nothing: a daemon thread bumps this rank's counter in torchrun's
    store every HEARTBEAT_S and reads its peers' (rank 0 watches every follower, followers watch rank 0). A peer
    whose counter stands still for PEER_DEAD_S, or a store that stops answering (rank 0's host gone), ends this
    process with an error naming the rank: the job exits instead of hanging or serving without a shard."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.peers = list(range(1, world)) if rank == 0 else [0]
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=max(PEER_DEAD_S, 5.0)))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="asyncllm-heartbeat", daemon=True)
        self.thread.start()

    @staticmethod
    def _key(rank: int) -> str:
        return f"asyncllm/heartbeat/{rank}"

    def _run(self) -> None:
        seen = {p: (-1, time.monotonic()) for p in self.peers}
        try:
            while not self.stopped.wait(HEARTBEAT_S):
                self.store.add(self._key(self.rank), 1)
                now = time.monotonic()
                for p in self.peers:
                    count = self.store.add(self._key(p), 0)
                    if count != seen[p][0]:
                        seen[p] = (count, now)
                    elif now - seen[p][1] > PEER_DEAD_S and not self.stopped.is_set():
                        log.error("rank %d: tensor-parallel rank %d stopped answering (no heartbeat for %.0f s); "
                                  "ending the job", self.rank, p, PEER_DEAD_S)
                        os._exit(1)
        except Exception as e:  # the store lives with torchrun on rank 0's host
            if not self.stopped.is_set():
                log.error("rank %d: lost torchrun's store (%s): rank 0's host is gone; ending the job", self.rank, e)
                os._exit(1)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def _on_one_host(host: dist.ProcessGroup, world: int) -> bool:
    """Every rank runs on the machine rank 0 runs on (same host name and boot: shared memory reaches them all).
    Collective over the gloo host group: rank 0's fingerprint goes out, each rank says whether it differs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()
    mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64)
    leader = mine.clone()
    dist.broadcast(leader, 0, group=host)
    differs = (mine != leader).to(torch.int64)
    dist.all_reduce(differs, dist.ReduceOp.MAX, group=host)
    return not bool(differs.item())


def _open_step_channel(rank: int, world: int, host: dist.ProcessGroup) -> StepChannel:
    """Rank 0 creates the ring and tells the followers its name; once all attached, the name is removed."""
    channel = StepChannel.create(world) if rank == 0 else None
    name = [channel.name if channel else None]
    dist.broadcast_object_list(name, src=0, group=host)
    if channel is None:
        channel = StepChannel.attach(name[0], world, rank)
    dist.barrier(group=host)
    if rank == 0:
        channel.unlink()
    return channel


def shutdown() -> None:
    """End the job's process group on this rank (every rank calls it once, rank 0 after telling the followers to
    stop, all after releasing CUDA graphs that hold NCCL work: NCCL waits for those before it destroys a
    communicator): a barrier so no rank tears down while a peer still reads, then destroy (else gloo's threads abort
    the interpreter at exit). A shutdown that does not finish in time exits the process instead of hanging."""
    global _current
    group, _current = _current, SINGLE
    if group.size == 1 or not dist.is_initialized():
        return
    watchdog = threading.Timer(COLLECTIVE_TIMEOUT_S, _exit_stuck, (group.rank,))
    watchdog.daemon = True
    watchdog.start()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no NCCL work may still run when its communicator is destroyed
    group.small_all_reduce = None  # its buffer is mapped by every peer: freed before the group goes
    dist.barrier(group=group.host_group)
    if group.heartbeat is not None:  # every rank has reached the barrier: none is dead
        group.heartbeat.stop()
        group.heartbeat = None
    dist.destroy_process_group()
    if group.steps is not None:
        group.steps.close()
        group.steps = None
    watchdog.cancel()


def _exit_stuck(rank: int) -> None:
    log.error("rank %d: the process group did not shut down within %.0f s; exiting", rank, COLLECTIVE_TIMEOUT_S)
    os._exit(1)


def shard_range(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    """[start, end) of rank's equal share of `total`; fails clearly when it does not divide."""
    if total % size:
        raise InvalidRequestError(f"{what} ({total}) is not divisible by the tensor-parallel size ({size})",
                                  "tensor_parallel_size")
    per = total // size
    return rank * per, (rank + 1) * per
