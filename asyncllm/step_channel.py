"""Rank 0 -> followers, one message (an int64 array) per step, through a ring of slots in shared memory (one host).

Why not a gloo broadcast: each one costs a few hundred microseconds of socket round trips, and the sender cannot
run ahead of a follower that has not posted its receive yet. Here rank 0 copies the step into the next slot and
goes on; it waits only when the ring is full (followers NUM_SLOTS slots behind). Followers poll: they spin while
steps come fast and back off to short sleeps when the engine idles.

Layout (int64 words): control = [leader pid, follower pids (n - 1), follower acks (n - 1)], then NUM_SLOTS slots of
[sequence number, words used, SLOT_WORDS words]. A message is [its length, payload...] cut into consecutive slots.
Publishing order: the data, then the slot's sequence number; a reader copies the data out after seeing the number
and then acknowledges it. This relies on stores becoming visible in program order (x86-64's total store order).

A peer that dies is noticed within about a second (its pid is checked while waiting) and raises an error naming
its rank, so the job exits instead of hanging.
"""
from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

NUM_SLOTS = 16
SLOT_WORDS = 64 * 1024  # 512 KiB of payload per slot; a larger message spans several slots
SPIN_S = 0.02  # busy-poll this long before sleeping between polls
SLEEP_S = (0.0002, 0.002)  # between polls: after SPIN_S, and after a second of waiting
LIVENESS_EVERY_S = 1.0


class PeerDiedError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a dead child not yet reaped by torchrun is a zombie ('Z')
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


class StepChannel:
    """One end of the ring: `create` on rank 0, `attach` on the followers (with the name rank 0 made)."""

    def __init__(self, shm: shared_memory.SharedMemory, size: int, rank: int) -> None:
        self.shm, self.size, self.rank = shm, size, rank
        n = size - 1
        words = np.ndarray((shm.size // 8,), dtype=np.int64, buffer=shm.buf)
        self.ctrl = words[: 1 + 2 * n]
        self.pids, self.acks = self.ctrl[1 : 1 + n], self.ctrl[1 + n :]
        self.slots = words[1 + 2 * n : 1 + 2 * n + NUM_SLOTS * (2 + SLOT_WORDS)].reshape(NUM_SLOTS, 2 + SLOT_WORDS)
        self.seq = 0  # last sequence number this end wrote (rank 0) or read (followers)

    @staticmethod
    def nbytes(size: int) -> int:
        return 8 * (1 + 2 * (size - 1) + NUM_SLOTS * (2 + SLOT_WORDS))

    @classmethod
    def create(cls, size: int) -> StepChannel:
        shm = shared_memory.SharedMemory(create=True, size=cls.nbytes(size))
        ch = cls(shm, size, 0)
        ch.ctrl[:] = 0
        ch.slots[:, 0] = -1
        ch.ctrl[0] = os.getpid()
        return ch

    @classmethod
    def attach(cls, name: str, size: int, rank: int) -> StepChannel:
        shm = shared_memory.SharedMemory(name=name)
        # the segment is rank 0's: this process must not unlink it at exit (Python < 3.13 registers attachments)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        ch = cls(shm, size, rank)
        ch.pids[rank - 1] = os.getpid()
        return ch

    @property
    def name(self) -> str:
        return self.shm.name

    def unlink(self) -> None:
        """Rank 0, once every follower attached: the name goes, the mapping stays (nothing leaks on a crash)."""
        self.shm.unlink()

    def close(self) -> None:
        self.ctrl = self.pids = self.acks = self.slots = None  # type: ignore[assignment]
        self.shm.close()

    # ---- rank 0 ---------------------------------------------------------------------------------------------
    def send(self, payload: np.ndarray) -> None:
        msg = np.concatenate([np.asarray([len(payload)], dtype=np.int64), payload.astype(np.int64, copy=False)])
        pos = 0
        while pos < len(msg):
            self.seq += 1
            self._wait(lambda: int(self.acks.min()) >= self.seq - NUM_SLOTS, self._dead_follower)
            slot = self.slots[self.seq % NUM_SLOTS]
            n = min(SLOT_WORDS, len(msg) - pos)
            slot[2 : 2 + n] = msg[pos : pos + n]
            slot[1] = n
            slot[0] = self.seq  # publish last
            pos += n

    def _dead_follower(self) -> str | None:
        for rank, pid in enumerate(self.pids.tolist(), start=1):
            if pid and not _alive(pid):
                return f"tensor-parallel rank {rank} (pid {pid}) died"
        return None

    # ---- followers ------------------------------------------------------------------------------------------
    def recv(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        need = -1
        while need < 0 or sum(len(p) for p in parts) < need:
            self.seq += 1
            slot = self.slots[self.seq % NUM_SLOTS]
            self._wait(lambda: int(slot[0]) == self.seq, self._dead_leader)
            part = slot[2 : 2 + int(slot[1])].copy()
            self.acks[self.rank - 1] = self.seq
            if need < 0:
                need = 1 + int(part[0])  # the length word, then the payload
            parts.append(part)
        return np.concatenate(parts)[1:need]

    def _dead_leader(self) -> str | None:
        pid = int(self.ctrl[0])
        return None if _alive(pid) else f"tensor-parallel rank 0 (pid {pid}) died"

    # ---- waiting --------------------------------------------------------------------------------------------
    @staticmethod
    def _wait(ready, dead) -> None:
        if ready():
            return
        start = check = time.monotonic()
        while not ready():
            now = time.monotonic()
            if now - start > SPIN_S:
                time.sleep(SLEEP_S[now - start > 1.0])
            if now - check > LIVENESS_EVERY_S:
                check = now
                if (why := dead()) is not None:
                    raise PeerDiedError(why)
