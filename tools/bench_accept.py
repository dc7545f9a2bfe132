"""How long a burst of connections takes to reach its handlers while the event loop is busy (each iteration blocked
`--busy-ms`, as the engine's step work blocks the server's): the server's listening socket accepted by the server's
own `listen` (server/listener.py, in bursts) or by aiohttp's SockSite (the loop's accept: one connection per
iteration under uvloop), under uvloop and under asyncio's loop. `--clients` processes send `--connections`
requests in all, together. One JSON line per (loop, site): ms from the first request sent to the last handler
started, and the loop iterations that took. CPU.
    python tools/bench_accept.py [--connections 256] [--busy-ms 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import time

from bench_common import run_fields


def serve(loop_name: str, site_name: str, busy_ms: float, port_q: mp.Queue, stop: mp.Event) -> None:
    import uvloop
    from aiohttp import web

    from asyncllm.serve import LISTEN_BACKLOG, bind, listen
    from asyncllm.server.app import make_runner

    async def main() -> None:
        iteration = [0]
        seen: list[tuple[float, int]] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append((time.perf_counter(), iteration[0]))
            return web.Response(text="ok")

        async def report(request: web.Request) -> web.Response:
            return web.json_response(seen)

        app = web.Application()
        app.router.add_get("/", handler)
        app.router.add_get("/seen", report)
        runner = make_runner(app)
        await runner.setup()
        sock = bind("127.0.0.1", 0)
        if site_name == "burst":
            await listen(runner, sock)
        else:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()  # as the server had it
        port_q.put(sock.getsockname()[1])
        while not stop.is_set():  # the busy loop: each iteration blocked for busy_ms
            t = time.perf_counter()
            while time.perf_counter() - t < busy_ms / 1e3:
                pass
            iteration[0] += 1
            await asyncio.sleep(0)
        await runner.cleanup()

    (uvloop.run if loop_name == "uvloop" else asyncio.run)(main())


def client(port: int, n: int, start_at: float, out: mp.Queue) -> None:
    while time.time() < start_at:
        time.sleep(0.0005)
    sent = []
    socks = []
    for _ in range(n):
        sent.append(time.perf_counter())
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        socks.append(s)
    for s in socks:
        s.recv(1024)
        s.close()
    out.put(sent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--busy-ms", type=float, default=5.0)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    for loop_name in ("uvloop", "asyncio"):
        for site_name in ("burst", "aiohttp"):
            port_q, out, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
            server = ctx.Process(target=serve, args=(loop_name, site_name, a.busy_ms, port_q, stop))
            server.start()
            port = port_q.get()
            start_at = time.time() + 0.5
            share = [a.connections // a.clients + (i < a.connections % a.clients) for i in range(a.clients)]
            procs = [ctx.Process(target=client, args=(port, n, start_at, out)) for n in share]
            for p in procs:
                p.start()
            sent = [t for _ in procs for t in out.get()]
            for p in procs:
                p.join()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /seen HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(1 << 16):
                    reply += chunk
            seen = json.loads(reply.split(b"\r\n\r\n", 1)[1])
            stop.set()
            server.join()
            times, iterations = [t for t, _ in seen], [k for _, k in seen]
            print(json.dumps({"bench": "accept", "loop": loop_name, "site": site_name, "connections": a.connections,
                              "busy_ms": a.busy_ms, "send_span_ms": round((max(sent) - min(sent)) * 1e3, 1),
                              "first_sent_to_last_handler_ms": round((max(times) - min(sent)) * 1e3, 1),
                              "handler_iterations": max(iterations) - min(iterations), **run_fields("cpu")}),
                  flush=True)


if __name__ == "__main__":
    main()
