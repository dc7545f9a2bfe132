"""SSEChoices (server/choices.py) under random interleavings: notifications from a stand-in engine at random stream
intervals, a connection whose buffer randomly backs up (direct writes switch to the handler and back), random
consumer delays, and random failures; some choices take the plain-text path (their notifications write text without
a chunk, and while the connection takes direct writes the engine hands them each token's text: `write_text`). Invariants: each choice's events carry its tokens (or their text) exactly once and in order,
its finish last and once; no notification writes to a backed-up connection; a failure reaches the handler as its
error; every write is one well-formed HTTP chunk.
ASYNCLLM_RANDOM_SEEDS=2000 runs more than CI's 150."""
from __future__ import annotations

import asyncio
import os
import random
from types import SimpleNamespace

import orjson
import pytest

from asyncllm.engine.async_engine import RequestStream
from asyncllm.errors import EngineDeadError
from asyncllm.sampling_params import SamplingParams
from asyncllm.server.choices import WRITE_HIGH_WATER, SSEChoices

SEEDS = int(os.environ.get("ASYNCLLM_RANDOM_SEEDS", 150))


class Engine:
    """What SSEChoices needs of AsyncEngine: open, abort, metrics; `step` delivers like AsyncEngine._deliver."""

    def __init__(self, rng: random.Random, interval: int) -> None:
        self.rng, self.interval = rng, interval
        self.live: list[RequestStream] = []
        self.produced: dict[str, list[int]] = {}
        self.aborted: list[str] = []
        self.metrics = SimpleNamespace(disconnects=SimpleNamespace(inc=lambda: None))

    def open(self, ids: list[int], params: SamplingParams, notify) -> RequestStream:
        rid = f"r{len(self.produced)}"
        req = SimpleNamespace(request_id=rid, num_prompt_tokens=len(ids), num_cached_tokens=0, max_tokens=params.max_tokens,
                              output_logprobs=None, prompt_logprobs=None, arrival_time=0.0)
        stream = RequestStream(req, Detok(), notify)  # type: ignore[arg-type]
        self.live.append(stream)
        self.produced[rid] = []
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        for s in self.live:
            if s.request_id == request_id:
                self._end(s, "abort")

    def _end(self, s: RequestStream, reason: str) -> None:
        s.finish_reason = reason
        self.live.remove(s)
        s.notify(s)

    def step(self, fail: bool) -> None:
        for s in [s for s in self.live if self.rng.random() < 0.8]:
            token = self.rng.randrange(1000)
            s.num_tokens += 1
            self.produced[s.request_id].append(token)
            failing = fail and self.rng.random() < 0.3
            sink = s.sink  # the direct text path, under AsyncEngine._deliver's conditions
            if (not failing and sink is not None and self.interval == 1 and s.num_tokens > 1 and sink[0].direct
                    and not s.new_ids and not s.detok.pending and s.num_tokens < s.req.max_tokens):
                s.num_taken = s.num_tokens
                sink[0].write_text(sink[1], f"{token} ")
                continue
            s.new_ids.append(token)
            s.detok.push(token)
            if failing:
                s.error = EngineDeadError("boom")
                self.live.remove(s)
                s.notify(s)
            elif s.num_tokens == s.req.max_tokens:
                self._end(s, "length")
            elif s.num_tokens == 1 or len(s.new_ids) >= self.interval:
                s.notify(s)


class Detok:
    """Each token's text is its id and a space; `take` hands out what is pending."""

    def __init__(self) -> None:
        self.pending = ""

    def push(self, token: int) -> bool:
        self.pending += f"{token} "
        return False

    def take(self, final: bool) -> str:
        text, self.pending = self.pending, ""
        return text


class Transport:
    """A connection whose unsent bytes pass the high-water mark after a random write (until drained)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.out: list[bytes] = []
        self.backed_up = False
        self.closing = False
        self.handler_writing = False

    def write(self, data: bytes) -> None:
        assert self.handler_writing or not self.backed_up, "a notification wrote to a backed-up connection"
        self.out.append(bytes(data))
        self.backed_up = self.backed_up or self.rng.random() < 0.15

    def get_write_buffer_size(self) -> int:
        return WRITE_HIGH_WATER + 1 if self.backed_up else 0

    def is_closing(self) -> bool:
        return self.closing


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def events(out: list[bytes]) -> list[list]:
    """Every write must be one HTTP chunk; its payload holds whole events, one JSON array per line."""
    found = []
    for w in out:
        size, _, rest = w.partition(b"\r\n")
        assert rest.endswith(b"\r\n") and len(rest) == int(size, 16) + 2, w
        found += [orjson.loads(line) for line in rest[:-2].splitlines()]
    return found


async def run_case(seed: int) -> None:
    rng = random.Random(seed)
    engine = Engine(rng, interval=rng.choice([1, 1, 2, 4]))
    transport = Transport(rng)

    async def drain() -> None:
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        transport.backed_up = False

    async def write(data: bytes) -> None:
        transport.handler_writing = True
        transport.write(chunked(data))
        transport.handler_writing = False
        for _ in range(rng.randint(0, 2)):
            await asyncio.sleep(0)

    request = SimpleNamespace(transport=transport, writer=SimpleNamespace(drain=drain))
    resp = SimpleNamespace(write=write)

    jobs = [([1, 2, 3], SamplingParams(max_tokens=rng.randint(1, 12))) for _ in range(rng.randint(1, 5))]
    # plain choices' events carry their text (as the server's do), the others' their token ids
    plain = [(b"[%d, " % i, b", null]\n") if rng.random() < 0.5 else None for i in range(len(jobs))]

    def frame(i: int, chunk) -> bytes:
        if plain[i] is not None:  # SSEChoices makes a plain choice's events before its last
            assert chunk.finish_reason is not None
            return orjson.dumps([i, chunk.text, chunk.finish_reason]) + b"\n"
        if not chunk.token_ids and chunk.finish_reason is None:
            return b""
        return orjson.dumps([i, chunk.token_ids, chunk.finish_reason]) + b"\n"

    choices = SSEChoices(engine, jobs, frame, plain)  # type: ignore[arg-type]
    first = orjson.dumps([-1, [], None]) + b"\n" if rng.random() < 0.5 else b""  # e.g. chat's role events
    handler = asyncio.ensure_future(choices.stream(request, resp, first))
    fail = rng.random() < 0.2
    for _ in range(200):
        if handler.done() or not engine.live:
            break
        engine.step(fail)
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
    try:
        await asyncio.wait_for(handler, 5)
        failed = None
    except EngineDeadError as e:
        failed = e
    finally:
        choices.close()
    got: dict[int, list[int]] = {i: [] for i in range(len(jobs))}
    finish: dict[int, list[str]] = {i: [] for i in range(len(jobs))}
    written = events(transport.out)
    if first:
        assert written[0] == [-1, [], None]
        written = written[1:]
    for i, payload, reason in written:
        assert not finish[i], f"choice {i} got an event after its finish"
        assert isinstance(payload, str) == (plain[i] is not None)
        got[i] += [int(t) for t in payload.split()] if isinstance(payload, str) else payload
        if reason is not None:
            finish[i].append(reason)
    errored = [s for s in choices.streams if s.error is not None]
    if failed is None:
        assert not errored
        for i, s in enumerate(choices.streams):
            assert finish[i] == ["length"] and got[i] == engine.produced[s.request_id]
    else:
        assert errored and not engine.live  # every other choice was ended (aborted) by close
        for i, s in enumerate(choices.streams):  # what was written is a prefix of what was produced
            assert got[i] == engine.produced[s.request_id][: len(got[i])]


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_interleavings_keep_every_choice_whole(seed):
    await run_case(seed)


class HeldOutbox:
    """An Outbox whose writes wait (as in the send thread) until `drained`, which hands them to the transport."""

    def __init__(self, transport: Transport, sender: object) -> None:
        self.transport, self.held = transport, []

    def write(self, data: bytes) -> None:
        self.held.append(data)

    async def drained(self) -> None:
        await asyncio.sleep(0)
        for data in self.held:
            self.transport.write(data)
        self.held.clear()

    def release(self) -> None:
        pass


async def test_an_error_is_written_after_what_the_send_thread_still_holds(monkeypatch):
    """A choice fails while its earlier events still wait in the send thread: the handler raises (the caller then
    writes the error event) only once they are on the connection, so the error comes after every token sent."""
    monkeypatch.setattr("asyncllm.server.choices.Outbox", HeldOutbox)
    engine = Engine(random.Random(0), interval=1)
    transport = Transport(SimpleNamespace(random=lambda: 1.0))  # type: ignore[arg-type]  # never backs up

    async def write(data: bytes) -> None:
        transport.handler_writing = True
        transport.write(chunked(data))
        transport.handler_writing = False

    async def drain() -> None:
        pass

    request = SimpleNamespace(transport=transport, writer=SimpleNamespace(drain=drain))
    choices = SSEChoices(engine, [([1, 2, 3], SamplingParams(max_tokens=50))], lambda i, c: b"",  # type: ignore[arg-type]
                         [(b"[0, ", b", null]\n")])
    handler = asyncio.ensure_future(choices.stream(request, SimpleNamespace(write=write), b"[-1, [], null]\n"))
    for _ in range(3):
        await asyncio.sleep(0)
    assert choices.direct  # notifications write themselves from here on
    stream = engine.live[0]
    for token in (7, 8, 9):
        stream.new_ids.append(token)
        stream.detok.push(token)
        stream.num_tokens += 1
        stream.notify(stream)
    assert len(choices.outbox.held) == 3  # type: ignore[union-attr]  # three events wait for the thread
    stream.error = EngineDeadError("boom")
    engine.live.remove(stream)
    stream.notify(stream)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(handler, 5)
    await write(b"error\n")  # what the server's handler writes next
    choices.close()
    assert transport.out[-1] == chunked(b"error\n")
    assert [e[1] for e in events(transport.out[1:-1])] == ["7 ", "8 ", "9 "]
