"""Rank 0 -> followers, one message (an int64 array) per step, by torch.distributed broadcasts: works across hosts.

Each message goes as a fixed-size first part [its length, up to FIRST_WORDS - 1 payload words] and, for a longer
one (a long prompt chunk), one more broadcast of the rest. The broadcasts use a process group of their own (NCCL
on CUDA from a device buffer, gloo on CPU), so a follower can post its receive of the next first part before it
runs the current step's forward (whose collectives go over the shards' group): rank 0 then never waits on a slow
follower for more than the collective itself, and on CUDA it does not wait at all (the broadcast is queued on the
device). The one-word message [0] (`END`, the engine's stop message) is the last: no receive is posted after it.

The shared-memory ring (step_channel) is cheaper on one host and stays the default there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

FIRST_WORDS = 4096  # 32 KiB: a decode step of 256 rows fits in the first part
END = np.zeros(1, dtype=np.int64)


class StepBroadcast:
    """Both ends: rank 0 `send`s, followers `recv` (every rank of `group` constructs it, in the same order)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group, self.device = group, device
        self.leader = dist.get_global_rank(group, 0)
        self.is_leader = dist.get_rank() == self.leader
        # followers: the first part posted ahead (from the first `recv` on: no collective of this group is pending
        # while the engine starts, e.g. captures CUDA graphs), and whether the stop message came
        self._pending: tuple[torch.Tensor, dist.Work] | None = None
        self._ended = False
        # every rank: one broadcast now (NCCL sets its communicator up here, not at the first step)
        self._broadcast(torch.zeros(1, dtype=torch.int64, device=device)).wait()

    def _broadcast(self, t: torch.Tensor) -> dist.Work:
        work = dist.broadcast(t, self.leader, group=self.group, async_op=True)
        assert work is not None
        return work

    # ---- rank 0 ---------------------------------------------------------------------------------------------
    def send(self, payload: np.ndarray) -> None:
        """CUDA: queued behind the work on the current stream, never waited on (NCCL keeps the buffer alive);
        CPU: returns once gloo has sent it (the followers' receive is posted already)."""
        msg = np.zeros(max(FIRST_WORDS, 1 + len(payload)), dtype=np.int64)
        msg[0], msg[1 : 1 + len(payload)] = len(payload), payload
        data = torch.from_numpy(msg)
        if self.device.type == "cuda":
            data = data.pin_memory().to(self.device, non_blocking=True)
        works = [self._broadcast(data[:FIRST_WORDS])]
        if len(msg) > FIRST_WORDS:
            works.append(self._broadcast(data[FIRST_WORDS:]))
        if self.device.type != "cuda":
            for work in works:
                work.wait()

    # ---- followers ------------------------------------------------------------------------------------------
    def _post(self) -> None:
        first = torch.empty(FIRST_WORDS, dtype=torch.int64, device=self.device)
        self._pending = first, self._broadcast(first)

    def recv(self) -> np.ndarray:
        assert not self._ended, "the stream ended"
        if self._pending is None:
            self._post()
        assert self._pending is not None
        first, work = self._pending
        self._pending = None
        work.wait()
        head = first.cpu().numpy()
        n = int(head[0])
        if 1 + n <= FIRST_WORDS:
            payload = head[1 : 1 + n].copy()
        else:
            rest = torch.empty(1 + n - FIRST_WORDS, dtype=torch.int64, device=self.device)
            self._broadcast(rest).wait()
            payload = np.concatenate([head[1:], rest.cpu().numpy()])
        self._ended = n == len(END) and np.array_equal(payload, END)
        if not self._ended:
            self._post()  # after the rest: every rank issues the group's broadcasts in the same order
        return payload

    def close(self) -> None:
        self._pending = None
