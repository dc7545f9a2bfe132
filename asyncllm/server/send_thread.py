"""Streamed chunks written to their sockets by a native thread, off the GIL.

At 256 streams a step makes 256 one-chunk writes, and each socket send() costs microseconds of kernel time that,
made from the event loop, is spent holding the GIL the whole engine shares. `SendThread` gathers one step's
writes (one `Outbox` per connection) into one batch, handed over once the loop's current callback is done; a
native thread (send_thread.c, compiled once with the system C compiler into the cache directory) sends each item
with one non-blocking send(). An item the socket does not take in full (a slow client) makes that connection
"spilled": its rest, and its later items, go through its asyncio transport in order, as every write did before.

Invariants: a connection's bytes reach its socket in the order written, whatever path each took; the handler
awaits `Outbox.drained()` before it writes through aiohttp itself (headers, the last events, the end), so aiohttp
never writes between two of the thread's items; an outbox's duplicated socket descriptor is closed only once no
batch holding its items is still in the thread.
"""
from __future__ import annotations

import asyncio
import ctypes
import heapq
import logging
import os
import subprocess
from array import array
from collections import deque
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

from asyncllm.native_build import load_native

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("send_thread.c")
_lib: ctypes.PyDLL | None | bool = False  # False: not tried yet


def native_library() -> ctypes.PyDLL | None:
    """send_thread.c built (once per version of its source) and loaded; None where it cannot be (no C compiler,
    not Linux): the server then writes every chunk through the transports, as before."""
    global _lib
    if _lib is not False:
        return _lib  # type: ignore[return-value]
    _lib = None
    try:
        lib = load_native(SOURCE)  # calls keep the GIL (each returns at once; the thread is native)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("socket writes stay on the event loop: the send thread could not be built (%s)", e)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name, res, args in (("sq_new", p, []), ("sq_eventfd", i32, [p]), ("sq_submit", i64, [p, i32, p, p, p]),
                            ("sq_reap", i64, [p, p, i32, p]), ("sq_forget", None, [p, i32]), ("sq_stop", None, [p]),
                            ("sq_free", None, [p])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _lib = lib
    return lib


class SendThread:
    """One native thread for the loop's socket writes. Loop thread only (not thread-safe on the Python side)."""

    def __init__(self, lib: ctypes.PyDLL, loop: asyncio.AbstractEventLoop) -> None:
        self._lib, self._loop = lib, loop
        self._q = lib.sq_new()
        if not self._q:
            raise OSError("the send thread did not start")
        self._efd = lib.sq_eventfd(self._q)
        self.submitted = 0  # sequence number of the last batch handed to the thread (batches are 1, 2, ...)
        self.completed = 0  # every batch up to this one is sent (or came back short)
        self._outs: list[Outbox] = []  # the batch being gathered: item i is (_outs[i], _data[i])
        self._data: list[bytes] = []
        self._flushing = False
        self._in_thread: deque[tuple[int, list[Outbox], list[bytes]]] = deque()
        self._shorts = (ctypes.c_int64 * 2)()
        self._n_short = ctypes.c_int()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # heap of (seq, id, future)
        self._closing: list[Outbox] = []  # released outboxes whose descriptor waits for the thread
        self._holding: list[Outbox] = []  # spilled outboxes with writes waiting for the thread's batches
        loop.add_reader(self._efd, self._reap)

    def queue(self, out: Outbox, data: bytes) -> None:
        if self._q is None:  # closed: the loop writes
            out._to_transport(data)
            return
        out.last_seq = self.submitted + 1
        self._outs.append(out)
        self._data.append(data)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        outs, data = self._outs, self._data
        if not outs or self._q is None:
            return
        n = len(outs)
        fd_arr, ends = array("i", [out.fd for out in outs]), array("q", accumulate(map(len, data)))
        seq = self._lib.sq_submit(self._q, n, fd_arr.buffer_info()[0], ends.buffer_info()[0], b"".join(data))
        if seq < 0:  # out of memory: keep the batch, try again shortly (nothing later overtakes it)
            self._flushing = True
            self._loop.call_later(0.001, self._flush)
            return
        assert seq == self.submitted + 1, (seq, self.submitted)
        self.submitted = seq
        self._in_thread.append((seq, outs, data))
        self._outs, self._data = [], []
        if len(self._shorts) < 2 * n:
            self._shorts = (ctypes.c_int64 * (2 * n))()

    def _reap(self) -> None:
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        shorts, n_short = self._shorts, self._n_short
        while seq := self._lib.sq_reap(self._q, shorts, len(shorts) // 2, ctypes.byref(n_short)):
            done, outs, data = self._in_thread.popleft()
            assert done == seq, (done, seq)
            for k in range(n_short.value):
                i = shorts[2 * k]
                outs[i].short(data[i], shorts[2 * k + 1])
            self.completed = seq
        if self._holding:
            self._holding = self._settle(self._holding, Outbox._flush_held)
        if self._closing:
            self._closing = self._settle(self._closing, Outbox.close_fd)
        while self._waiters and self._waiters[0][0] <= self.completed:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    def _settle(self, outs: list[Outbox], action: Callable[[Outbox], None]) -> list[Outbox]:
        """Applies `action` to the outboxes the thread is done with; returns the others."""
        left = []
        for out in outs:
            if out.last_seq > self.completed:
                left.append(out)
            else:
                action(out)
        return left

    def wait_for(self, seq: int) -> asyncio.Future[None]:
        fut = self._loop.create_future()
        if seq <= self.completed:
            fut.set_result(None)
        else:
            heapq.heappush(self._waiters, (seq, id(fut), fut))
        return fut

    def forget(self, fd: int) -> None:
        if self._q is not None:  # (a closed thread forgot everything)
            self._lib.sq_forget(self._q, fd)

    def close(self) -> None:
        """Sends what is queued, stops the thread, closes every descriptor still open."""
        if self._q is None:
            return
        self._flush()
        self._loop.remove_reader(self._efd)
        self._lib.sq_stop(self._q)  # returns once the thread has sent every batch
        self._reap()  # short sends go to their transports; waiters, held writes and descriptors settle
        self._lib.sq_free(self._q)
        self._q = None


class Outbox:
    """One connection's streamed writes: through `sender` while each of them went out whole, else (and without a
    sender) through the transport, after whatever the thread still holds of it."""

    def __init__(self, transport: asyncio.Transport, sender: SendThread | None) -> None:
        self.transport = transport
        self.sender = sender
        self.last_seq = 0  # the last batch holding one of this connection's items
        self.failed = False  # the socket refused a write (the client is gone): later writes are dropped
        self.held: list[bytes] = []  # transport writes waiting for the thread's batches before them
        sock = transport.get_extra_info("socket") if sender is not None else None
        # ours: never closed (and reused) while the thread may write to it
        self.fd = os.dup(sock.fileno()) if sock is not None else -1
        self.spilled = self.fd < 0  # writes go through the transport

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        if not self.spilled:
            self.sender.queue(self, data)  # type: ignore[union-attr]
        elif self.held or (self.sender is not None and self.sender.completed < self.last_seq):
            if not self.held:
                self.sender._holding.append(self)  # type: ignore[union-attr]
            self.held.append(data)
        else:
            self._to_transport(data)

    def _to_transport(self, data: bytes) -> None:
        if self.transport.is_closing():  # the client is gone (a closed uvloop transport raises on write)
            self.failed = True
            self.held.clear()
        else:
            self.transport.write(data)

    def short(self, data: bytes, sent: int) -> None:
        """The thread sent only `sent` bytes of `data` (-errno: the socket failed); called in write order."""
        self.spilled = True
        if sent < 0:
            self.failed = True
            self.held.clear()
        elif not self.failed:
            self._to_transport(data[sent:] if sent else data)

    def _flush_held(self) -> None:
        held, self.held = self.held, []
        if not self.failed and held:
            self._to_transport(b"".join(held))

    async def drained(self) -> None:
        """Returns once the thread holds nothing of this connection and every write is with the transport."""
        if self.sender is not None and self.sender.completed < self.last_seq:
            await self.sender.wait_for(self.last_seq)
        self._flush_held()

    def release(self) -> None:
        """The response is over (or abandoned): the descriptor is closed once the thread is done with it."""
        if self.fd < 0:
            return
        sender = self.sender
        assert sender is not None
        self.spilled = True  # (nothing more goes to the thread on this descriptor)
        if sender.completed >= self.last_seq:
            self.close_fd()
        else:
            sender._closing.append(self)

    def close_fd(self) -> None:
        if self.fd >= 0:
            self.sender.forget(self.fd)  # type: ignore[union-attr]
            os.close(self.fd)
            self.fd = -1
