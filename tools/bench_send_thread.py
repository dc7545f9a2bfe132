"""What a streamed chunk's socket write costs the event loop: through the asyncio transport (the loop makes the
send() itself, holding the GIL) vs through the native send thread (asyncllm/server/send_thread.py).

N loopback connections read by another process; each "step" spends --work-us of pure-Python time on the loop
thread (standing in for the rest of an engine step) and then writes one SSE-sized chunk to every connection.
One JSON line per mode and round: wall time per step, and the loop thread's own CPU time per write outside the
stand-in work (time.thread_time: what the loop, and so the GIL, pays per chunk, its flush and reaping included). On a machine with a core to spare
for the send thread the wall time per step approaches the work alone.
    python tools/bench_send_thread.py --connections 256 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import selectors
import socket
import time

import uvloop

from asyncllm.server.send_thread import Outbox, SendThread, native_library
from bench_common import run_fields


def read_everything(port: int, n: int) -> None:
    """The clients: n connections, read until the server closes them."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while sel.get_map():
        for key, _ in sel.select():
            try:
                if not key.fileobj.recv(1 << 20):  # type: ignore[union-attr]
                    sel.unregister(key.fileobj)
            except BlockingIOError:
                pass


def busy(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


async def measure(mode: str, n: int, steps: int, work_us: float, chunk: bytes) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    connected = asyncio.Event()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]
            if len(transports) == n:
                connected.set()

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    clients = mp.get_context("spawn").Process(target=read_everything, args=(server.sockets[0].getsockname()[1], n))
    clients.start()
    await connected.wait()
    sender = SendThread(native_library(), loop) if mode == "thread" else None  # type: ignore[arg-type]
    outs = [Outbox(t, sender) for t in transports]
    t0, c0 = time.perf_counter(), time.thread_time()
    in_work = 0.0  # the loop thread's CPU time inside the stand-in work (less than work_us when preempted)
    for _ in range(steps):
        w = time.thread_time()
        busy(work_us)
        in_work += time.thread_time() - w
        for out in outs:
            out.write(chunk)
        await asyncio.sleep(0)
    for out in outs:
        await out.drained()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    for out in outs:
        out.release()
    if sender is not None:
        sender.close()
    for t in transports:
        t.close()
    server.close()
    clients.join(30)
    return {"wall_ms_per_step": round(wall / steps * 1e3, 3),
            "loop_us_per_write": round((cpu - in_work) / steps / n * 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--work-us", type=float, default=2000.0, help="pure-Python loop work per step (µs)")
    p.add_argument("--chunk-bytes", type=int, default=120, help="SSE event size (a one-token completions event)")
    p.add_argument("--rounds", type=int, default=3, help="modes alternate, this many times each")
    args = p.parse_args()
    if native_library() is None:
        raise SystemExit("no C compiler: the send thread cannot be built here")
    data = b"x" * args.chunk_bytes
    chunk = b"%x\r\n%b\r\n" % (len(data), data)
    for _ in range(args.rounds):
        for mode in ("loop", "thread"):
            r = uvloop.run(measure(mode, args.connections, args.steps, args.work_us, chunk))
            print(json.dumps({"bench": "send_thread", "mode": mode, "connections": args.connections,
                              "work_us_per_step": args.work_us, **r, **run_fields()}), flush=True)


if __name__ == "__main__":
    main()
