"""The listening socket, accepted in bursts.

libuv (under uvloop) accepts one connection per event-loop iteration since its 1.45 (libuv pull request 3696: it
relies on level-triggered polling for the next one). An iteration of this server can take milliseconds: the
engine's step work runs in it. So a burst of clients waited one iteration each: on the H200, the last of 256
streams sent together reached its handler 0.5 s after the first (the engine stepping meanwhile with the few that
were in), and time to first token at 256 streams was set by that. `BurstSite` takes every connection the kernel
has completed each time the socket is readable, as asyncio's own loop does, and hands each to the loop's
transport (`connect_accepted_socket`).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

MAX_ACCEPTS = 1024  # connections taken per readiness of the socket (the rest wait for the next iteration)
# after an accept() failure (out of descriptors or memory: the connection stays in the kernel's queue), accepts pause
# this long, so the socket, readable still, does not spin the loop until they come back
PAUSE_S = 0.1


class BurstListener:
    """What aiohttp uses of an asyncio Server (`sockets`, `close`), accepting in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Any) -> None:
        self.loop, self.factory = loop, factory
        self.sockets = [sock]
        self.closed = False
        self._connecting: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock = self.sockets[0]
        for _ in range(MAX_ACCEPTS):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up before it was accepted
                continue
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, or anything else: never raise into the loop
                log.warning("cannot accept a connection (%s): pausing accepts for %.1f s", e, PAUSE_S)
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(PAUSE_S, self._resume)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
            self._connecting.add(task)
            task.add_done_callback(lambda t, conn=conn: self._connected(t, conn))

    def _connected(self, task: asyncio.Task[Any], conn: socket.socket) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("dropped an accepted connection: %s", task.exception())
            conn.close()

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sockets[0].fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already accepted stay open)."""
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sockets[0].fileno())
            self.sockets[0].close()


class BurstSite(web.SockSite):
    """aiohttp's SockSite on an already listening socket, accepted by `BurstListener`."""

    async def start(self) -> None:
        await web.BaseSite.start(self)
        assert self._runner.server is not None, "the runner is not set up"
        self._server = BurstListener(asyncio.get_running_loop(), self._sock, self._runner.server)  # type: ignore[assignment]
