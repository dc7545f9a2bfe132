"""The native send thread (asyncllm/server/send_thread.py): every connection receives exactly its bytes, in order,
whichever path each write took (the thread, or the transport after a short send), under random writes, small
socket buffers, paused readers and clients that leave; descriptors are closed once the thread is done with them."""
from __future__ import annotations

import asyncio
import os
import random
import socket
from typing import Any

import pytest
import uvloop

from asyncllm.server.send_thread import Outbox, SendThread, native_library

SEEDS = int(os.environ.get("ASYNCLLM_RANDOM_SEEDS", 30))  # more: ASYNCLLM_RANDOM_SEEDS=400
lib = native_library()
needs_lib = pytest.mark.skipif(lib is None, reason="no C compiler here: the server writes through its transports")


class Peer(asyncio.Protocol):
    """The server side of one connection: keeps its transport."""

    def __init__(self, accepted: asyncio.Queue[asyncio.Transport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # short sends come soon
        self.accepted.put_nowait(transport)  # type: ignore[arg-type]


async def connections(n: int) -> tuple[list[asyncio.Transport], list[asyncio.StreamReader], list[asyncio.StreamWriter],
                                       asyncio.AbstractServer]:
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    server = await asyncio.get_running_loop().create_server(lambda: Peer(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports, readers, writers = [], [], []
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        readers.append(reader)
        writers.append(writer)
        transports.append(await accepted.get())
    return transports, readers, writers, server


async def read_all(reader: asyncio.StreamReader, rng: random.Random, paused: float) -> bytes:
    out = bytearray()
    while chunk := await reader.read(rng.randrange(1, 8192)):
        out += chunk
        if rng.random() < paused:  # a slow client: the server's socket fills, sends come back short
            await asyncio.sleep(rng.random() * 0.01)
    return bytes(out)


async def random_writes(seed: int, use_thread: bool) -> tuple[int, int]:
    """Random steps of writes to random connections; returns how many outboxes spilled and how many failed."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    sender = SendThread(lib, loop) if use_thread else None
    n = rng.randrange(1, 12)
    transports, readers, writers, server = await connections(n)
    fds_before = len(os.listdir("/proc/self/fd"))
    outs = [Outbox(t, sender) for t in transports]
    reads = [asyncio.create_task(read_all(r, random.Random(rng.random()), rng.choice([0.0, 0.05, 0.5])))
             for r in readers]
    leaving = [i for i in range(n) if rng.random() < 0.2]  # these clients close their end midway
    left: set[int] = set()
    sent: list[bytearray] = [bytearray() for _ in range(n)]
    for step in range(rng.randrange(1, 60)):
        for i in range(n):
            if rng.random() < 0.7:
                data = b"%d:%d:" % (i, step) + os.urandom(rng.choice([10, 100, 3000, 20000])).hex().encode()
                outs[i].write(data)
                sent[i] += data
        if leaving and rng.random() < 0.1:
            i = leaving.pop()
            writers[i].transport.abort()
            left.add(i)
        if rng.random() < 0.2:
            i = rng.randrange(n)
            await outs[i].drained()  # the handler's own writes may follow: nothing of this one is in the thread
            assert not outs[i].held
            if sender is not None:
                assert sender.completed >= outs[i].last_seq
        await asyncio.sleep(0 if rng.random() < 0.7 else 0.002)
    for i, out in enumerate(outs):
        await out.drained()
        out.release()
        if not writers[i].transport.is_closing():
            transports[i].close()  # the server ends the response; the client reads to EOF
    got = await asyncio.gather(*reads, return_exceptions=True)
    for i in range(n):
        if i in left:  # what it got before it left is a prefix of what was written
            assert isinstance(got[i], BaseException) or bytes(sent[i]).startswith(got[i])
            continue
        assert not outs[i].failed
        assert got[i] == bytes(sent[i]), f"connection {i}: {len(got[i])} bytes received, {len(sent[i])} written"
    if sender is not None:
        while sender._closing:  # released outboxes close their descriptors once the thread is done with them
            await asyncio.sleep(0.001)
        assert sender.completed == sender.submitted
        sender.close()
    assert all(o.fd == -1 for o in outs)
    assert len(os.listdir("/proc/self/fd")) <= fds_before, "a duplicated descriptor leaked"
    for w in writers:
        w.close()
    server.close()
    return sum(o.spilled for o in outs), sum(o.failed for o in outs)


@needs_lib
@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_random_writes_arrive_whole_and_in_order(seed: int, loop: str) -> None:
    run = uvloop.run if loop == "uvloop" else asyncio.run
    spilled, failed = run(random_writes(seed, use_thread=True))
    assert spilled >= failed


@needs_lib
def test_the_random_writes_spill_and_fail() -> None:
    """The workloads above reach both paths: short sends to slow clients and sends to clients that left."""
    totals = [uvloop.run(random_writes(seed, use_thread=True)) for seed in range(12)]
    assert sum(s for s, _ in totals) >= 6 and sum(f for _, f in totals) >= 1, totals


@pytest.mark.parametrize("seed", range(max(1, SEEDS // 6)))
def test_without_the_thread_writes_go_through_the_transport(seed: int) -> None:
    uvloop.run(random_writes(seed, use_thread=False))


async def big_writes(count: int, size: int) -> tuple[SendThread, Outbox, asyncio.StreamReader, list[bytes], Any]:
    """One connection through a new send thread, written `count` items of `size` bytes (far more than the socket
    buffers take at once), a loop turn apart; returns what closes it too."""
    sender = SendThread(lib, asyncio.get_running_loop())
    (transport,), (reader,), (writer,), server = await connections(1)
    out = Outbox(transport, sender)
    big = [bytes([65 + k]) * size for k in range(count)]
    for data in big:
        out.write(data)
        await asyncio.sleep(0)
    return sender, out, reader, big, (writer, server)


@needs_lib
def test_a_short_send_spills_the_rest_to_the_transport_in_order() -> None:
    async def main() -> None:
        sender, out, reader, big, closers = await big_writes(5, 200_000)
        await out.drained()
        assert out.spilled and not out.failed
        out.release()  # the duplicated descriptor closes, else the client never sees the end
        out.transport.close()
        assert await reader.read() == b"".join(big)
        sender.close()
        for c in closers:
            c.close()
    uvloop.run(main())


@needs_lib
def test_closing_the_thread_sends_what_it_holds_and_settles_every_waiter() -> None:
    async def main() -> None:
        sender, out, reader, big, closers = await big_writes(4, 100_000)
        waiter = asyncio.ensure_future(out.drained())
        await asyncio.sleep(0)
        sender.close()  # the server's cleanup: nothing is lost, nobody waits forever
        await asyncio.wait_for(waiter, 5)
        out.write(b"after")  # a write after the close goes through the transport
        out.release()
        assert out.fd == -1
        out.transport.close()
        assert await reader.read() == b"".join(big) + b"after"
        for c in closers:
            c.close()
    uvloop.run(main())
