"""The engine streams of one HTTP request (its prompts x n choices), fed by the engine's push notifications.

A streamed response is written from the notification itself, straight to the connection: one HTTP chunk per
notification and no task switch per token. The handler coroutine wakes only for what must be awaited: the first
write (it sends the headers), a client that reads slowly (the handler waits for the socket to drain while the
tokens that arrive meanwhile coalesce, one chunk per choice), errors, and the end.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from asyncllm.engine.async_engine import AsyncEngine, RequestStream, StreamChunk
from asyncllm.sampling_params import SamplingParams
from asyncllm.server.send_thread import Outbox, SendThread

# bytes a connection may hold unsent before its choices stop being written from notifications (the handler
# then awaits the drain): a client that does not read costs at most this plus its requests' own outputs
WRITE_HIGH_WATER = 64 << 10


class Choices:
    """Opens one engine stream per (prompt ids, params) job; `collect` or `SSEChoices.stream` consumes them.
    Leaving the handler early must call `close`, which aborts every choice still running (frees its KV)."""

    def __init__(self, engine: AsyncEngine, jobs: list[tuple[list[int], SamplingParams]]) -> None:
        self.engine = engine
        self.streams: list[RequestStream] = []
        self.open = len(jobs)  # choices whose last chunk has not been consumed
        self.ready: dict[int, None] = {}  # choices with output for the handler, in notification order
        self.wake = asyncio.Event()
        self.closed = False
        try:
            for i, (ids, params) in enumerate(jobs):
                self.streams.append(engine.open(ids, params, partial(self._notify, i)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        for s in self.streams:
            if not s.done:
                self.engine.metrics.disconnects.inc()
                self.engine.abort(s.request_id)

    def _notify(self, i: int, stream: RequestStream) -> None:
        """The engine has output for choice i (loop thread, inside the engine loop). Default: the handler takes
        it when the choice is done."""
        if not self.closed and stream.done:
            self.ready[i] = None
            self.wake.set()

    async def _next_ready(self) -> list[int]:
        await self.wake.wait()
        self.wake.clear()
        ready, self.ready = list(self.ready), {}
        return ready

    async def collect(self) -> list[StreamChunk]:
        """Every choice's whole output as one chunk (text, token ids, finish reason, usage), in job order.
        Raises the first error (or an abort) of any choice."""
        out: list[StreamChunk | None] = [None] * len(self.streams)
        while self.open:
            for i in await self._next_ready():
                out[i] = take(self.streams[i])
                self.open -= 1
        return out  # type: ignore[return-value]


def take(stream: RequestStream) -> StreamChunk:
    """The stream's next chunk; raises if it ended in an error or was aborted from elsewhere."""
    stream.raise_error()
    chunk = stream.take()
    if chunk.finish_reason == "abort":
        raise web.HTTPServiceUnavailable(text="the request was aborted before it finished")
    return chunk


class SSEChoices(Choices):
    """Choices streamed as server-sent events; `frame(i, chunk)` gives the event bytes of a chunk (b"" for none).
    `plain[i]`, when not None, is the (before, after) bytes around the JSON string of the text in choice i's
    events before its last, which carry nothing but text: those events are made here from the new text alone
    (handed over by the engine: `write_text`; or RequestStream.take_text; no chunk per token), and `frame` gets
    choice i's last chunk only.
    Invariant for the direct writes: the response is prepared, chunked, uncompressed, and its headers are sent
    (`direct` turns on only after the handler's first `resp.write`), so each write is one HTTP chunk; they go
    through the connection's `Outbox` (the send thread when there is one), which the handler drains before it
    writes through aiohttp itself."""

    def __init__(self, engine: AsyncEngine, jobs: list[tuple[list[int], SamplingParams]],
                 frame: Callable[[int, StreamChunk], bytes],
                 plain: Sequence[tuple[bytes, bytes] | None] | None = None, sender: SendThread | None = None) -> None:
        self.frame = frame
        self.plain = plain if plain is not None else [None] * len(jobs)
        self.direct = False  # notifications write to the connection themselves
        self.transport: asyncio.Transport | None = None
        self.sender = sender
        self.outbox: Outbox | None = None
        super().__init__(engine, jobs)
        for i, stream in enumerate(self.streams):
            if self.plain[i] is not None:
                stream.sink = (self, i)  # the engine hands this choice's text to write_text while `direct`

    def close(self) -> None:
        super().close()
        if self.outbox is not None:
            self.outbox.release()
            self.outbox = None

    def _event(self, i: int, stream: RequestStream) -> bytes:
        """Choice i's next event bytes (b"" for none); raises if it ended in an error or was aborted."""
        if not stream.done and self.plain[i] is not None:  # the per-token path of plain text
            return self._plain_event(i, stream.take_text())
        return self.frame(i, take(stream))

    def _plain_event(self, i: int, text: str) -> bytes:
        wrap = self.plain[i]
        return wrap[0] + orjson.dumps(text) + wrap[1] if text else b""  # type: ignore[index]

    def write_text(self, i: int, text: str) -> None:
        """Plain choice i's new text (not empty), from the engine loop while `direct` (TextSink): its event, written
        at once. (Once per streamed token: `_plain_event` and `_write_direct` inlined.)"""
        if self.closed:
            return
        transport = self.transport
        if transport is None or transport.is_closing():  # the client is gone: the handler finds out at its next write
            self._to_handler(i)
            return
        wrap = self.plain[i]
        data = wrap[0] + orjson.dumps(text) + wrap[1]  # type: ignore[index]
        self.outbox.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            self.direct = False

    def _notify(self, i: int, stream: RequestStream) -> None:
        if self.closed:
            return
        transport = self.transport
        if self.direct and transport is not None and not transport.is_closing() and stream.error is None \
                and stream.finish_reason != "abort":
            self._write_direct(transport, self._event(i, stream))
            if stream.done:
                self.open -= 1
                if not self.open:
                    self.wake.set()
            return
        self._to_handler(i)  # errors, slow clients and first writes go through the handler

    def _write_direct(self, transport: asyncio.Transport, data: bytes) -> None:
        """`data` (if any) as one HTTP chunk through the outbox; past the high-water mark the handler takes over."""
        if data:
            self.outbox.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            self.direct = False

    def _to_handler(self, i: int) -> None:
        self.direct = False
        self.ready[i] = None
        self.wake.set()

    async def stream(self, request: web.Request, resp: web.StreamResponse, first: bytes = b"") -> None:
        """Write `first`, then every choice's events until all are done (raises on a choice's error)."""
        self.transport = request.transport
        self.outbox = outbox = Outbox(self.transport, self.sender)  # type: ignore[arg-type]
        if first:
            await resp.write(first)
            await request.writer.drain()  # n x role events can fill the socket too
            self.direct = True
        while self.open:
            ready = await self._next_ready()
            while ready:
                self.direct = False  # the handler writes (and may wait for the drain): notifications queue
                data = []
                try:
                    for i in ready:
                        data.append(self._event(i, self.streams[i]))
                        self.open -= self.streams[i].done
                except Exception:  # a choice's error: the caller writes it, after what the thread still holds
                    await outbox.drained()
                    raise
                await outbox.drained()
                await resp.write(b"".join(data))  # the first write sends the headers
                await request.writer.drain()  # a slow client: wait until the socket takes more
                ready, self.ready = list(self.ready), {}
            self.direct = True
        await outbox.drained()  # the handler writes the end itself


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
