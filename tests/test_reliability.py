"""Never crash, never lie: shutdown, authentication, hostile inputs, start-up errors, weights, close()."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from safetensors.torch import load_file, save_file

from asyncllm import LLM, AsyncEngine, EngineShutdownError, InvalidRequestError, SamplingParams
from asyncllm.errors import ModelLoadError
from asyncllm.server.app import ServerSettings, build_app, make_runner
from conftest import make_tiny_model, start_server


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny model with a long context: requests that cannot finish within a test's grace period."""
    return make_tiny_model(tmp_path_factory.mktemp("long") / "llama", "llama", tokenizer_from=smollm2_dir,
                           max_position_embeddings=1 << 17)

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def serve_cmd(model: Path | None, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asyncllm.serve", *(["--model", str(model)] if model else []), "--port", "0",
            "--log-level", "warning", "--max-model-len", "512", *extra]


def sse_events(text: str) -> list[dict | str]:
    return [orjson.loads(line[6:]) if line[6:].startswith("{") else line[6:]
            for line in text.splitlines() if line.startswith("data: ")]


# ---- shutdown ---------------------------------------------------------------------------------------------------
def test_sigterm_cuts_streams_with_an_error_never_a_normal_finish(long_model):
    """SIGTERM with requests in flight that cannot finish within --shutdown-timeout: every stream ends with an
    error event (no finish_reason), every non-streamed request gets 503 with the error body; exit 0."""
    proc, url, _ = start_server(serve_cmd(long_model, "--shutdown-timeout", "0.3", "--max-model-len", "16384"))
    endless = {**LONG, "max_tokens": 16000}

    async def run() -> tuple[list[str], list[tuple[int, dict]]]:
        async with aiohttp.ClientSession() as s:
            async def streamed() -> str:
                async with s.post(f"{url}/v1/completions", json={"prompt": [5, 6, 7], "stream": True, **endless}) as r:
                    return await r.text()

            async def whole() -> tuple[int, dict]:
                async with s.post(f"{url}/v1/completions", json={"prompt": [8, 9], **endless}) as r:
                    return r.status, await r.json()

            tasks = [asyncio.create_task(streamed()) for _ in range(8)] + [asyncio.create_task(whole()) for _ in range(4)]
            await asyncio.sleep(1.0)  # all running, none near its 400th token
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
            return results[:8], results[8:]

    try:
        streams, wholes = asyncio.run(run())
        assert proc.wait(timeout=30) == 0
        assert "leaked" not in proc.stdout.read()  # a clean exit: nothing left frozen for native bindings to report
    finally:
        proc.kill()
    for text in streams:
        events = sse_events(text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["type"] == "service_unavailable" and "shut down" in events[-2]["error"]["message"]
        assert all(c.get("finish_reason") is None for e in events[:-2] for c in e["choices"])
        assert len(events) > 3  # it had streamed tokens before the cut
    for status, body in wholes:
        assert status == 503 and "shut down" in body["error"]["message"]


async def test_shutdown_drains_then_refuses(long_model):
    """AsyncEngine.shutdown(timeout): new requests are refused at once, short ones finish normally, long ones end
    with EngineShutdownError."""
    engine = await AsyncEngine(str(long_model), max_model_len=1 << 16).start()
    short = [asyncio.create_task(engine.generate([5, 6, 7], SamplingParams(max_tokens=5, temperature=0)))
             for _ in range(3)]
    long = [asyncio.create_task(engine.generate([5, 6, 7], SamplingParams(max_tokens=60000, ignore_eos=True)))
            for _ in range(3)]
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(engine.shutdown(timeout=1.0))
    await asyncio.sleep(0.01)
    assert not engine.accepting
    with pytest.raises(EngineShutdownError):
        await engine.generate([1, 2], SamplingParams(max_tokens=2))
    await stopping
    done = [await t for t in short]
    assert [len(o.token_ids) for o in done] == [5, 5, 5] and {o.finish_reason for o in done} == {"length"}
    for t in long:
        with pytest.raises(EngineShutdownError):
            await t
    await engine.shutdown()  # idempotent


# ---- the in-process server: authentication, bodies, token ids ----------------------------------------------------
@pytest_asyncio.fixture
async def keyed(tiny_models):
    engine = await AsyncEngine(str(tiny_models["llama"]), max_model_len=512).start()
    runner = make_runner(build_app(engine, ServerSettings("tiny", api_key="sekret", max_body_bytes=1 << 20)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sekret"}) as s:
        yield engine, f"http://127.0.0.1:{runner.addresses[0][1]}", s
    await engine.shutdown()
    await runner.cleanup()


async def test_api_key_covers_every_route_that_does_work(keyed):
    engine, url, s = keyed
    async with aiohttp.ClientSession() as anon:
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]}),
                           ("/v1/completions", {"prompt": "hi"})):
            r = await anon.post(url + path, json=body)
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error", path
        for path in ("/health", "/metrics", "/version"):  # probes and scrapers stay open
            assert (await anon.get(url + path)).status == 200
    assert (await s.post(url + "/tokenize", json={"prompt": "hi"})).status == 200
    with pytest.raises(ValueError, match="empty"):
        build_app(engine, ServerSettings("tiny", api_key=""))


@pytest.mark.parametrize("body, status, param", [
    ({"tokens": [-1]}, 400, "tokens"),
    ({"tokens": [2**40]}, 400, "tokens"),
    ({"tokens": [5, 49152]}, 400, "tokens"),
    ({"tokens": "abc"}, 400, "tokens"),
])
async def test_detokenize_rejects_ids_outside_the_vocabulary(keyed, body, status, param):
    _, url, s = keyed
    r = await s.post(url + "/detokenize", json=body)
    assert r.status == status and (await r.json())["error"]["param"] == param


@pytest.mark.parametrize("encoding, data, status", [
    ("gzip", b'{"prompt": "hi"}', 400),  # says gzip, is not
    ("deflate", b'{"prompt": "hi"}', 400),
    ("br", b'{"prompt": "hi"}', 415),
    ("gzip", gzip.compress(b'{"prompt": "x"}')[:-6], 400),  # truncated
    ("gzip", gzip.compress(b" " * (2 << 20) + b'{"prompt": "hi"}'), 413),  # a bomb past the body limit
    ("gzip", gzip.compress(b'{"prompt": [5, 6], "max_tokens": 2}'), 200),
])
async def test_content_encoding(keyed, encoding, data, status):
    _, url, s = keyed
    r = await s.post(url + "/v1/completions", data=data,
                     headers={"Content-Encoding": encoding, "Content-Type": "application/json"})
    assert r.status == status, await r.text()
    assert r.content_type == "application/json"
    if status != 200:
        assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_huge_prompts_are_rejected_before_tokenization(keyed, monkeypatch):
    engine, url, s = keyed
    calls = []
    tok = engine.tokenizer
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [1])
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or {"input_ids": [1]})
    huge = "word " * 200_000  # 1 MB: cannot fit in 512 tokens
    for path, body in (("/v1/completions", {"prompt": huge}), ("/tokenize", {"prompt": huge}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})):
        r = await s.post(url + path, json=body)
        assert r.status == 400 and "too long" in (await r.json())["error"]["message"], path
    assert not calls


async def wait_all_free(engine: AsyncEngine, seconds: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while engine.num_free_blocks != engine.num_blocks and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert engine.num_free_blocks == engine.num_blocks


async def test_client_gone_mid_stream_frees_every_choice_without_an_error_log(keyed, caplog):
    """A client that closes its connection after a few events (tokens are written straight to the socket from
    the engine loop): every choice's blocks are freed, nothing is logged as an error."""
    engine, url, _ = keyed
    caplog.set_level(logging.INFO)
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"prompt": [5, 6], "n": 4, "stream": True, **LONG})
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    seen = b""
    while seen.count(b"data: {") < 8:
        seen += await reader.read(4096)
    assert engine.num_free_blocks < engine.num_blocks  # the choices are running
    writer.close()
    await wait_all_free(engine)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # aborted, not run to their end
    assert engine.metrics.value("asyncllm:client_disconnects_total") == 4


async def test_a_client_that_stops_reading_gets_everything_later_in_fewer_chunks(keyed):
    """Back-pressure: while a client does not read, its tokens coalesce (the server's buffer stays bounded);
    once it reads, every choice's tokens and text are complete, in order, and equal the non-streamed output."""
    engine, url, s = keyed
    req = {"prompt": [5, 6], "n": 2, "return_token_ids": True, **LONG}
    async with s.post(url + "/v1/completions", json=req) as r:
        expected = (await r.json())["choices"]

    def finished() -> float:
        return engine.metrics.value("asyncllm:request_success_total", finished_reason="length")

    finished_before = finished()

    @web.middleware
    async def small_socket_buffers(request, handler):  # so the kernel cannot absorb the whole output
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return await handler(request)

    app = build_app(engine, ServerSettings("tiny"))
    app.middlewares.append(small_socket_buffers)
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", runner.addresses[0][1]))
    body = orjson.dumps({**req, "stream": True})
    await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    for _ in range(1200):  # the choices run to their end while the client reads nothing
        if finished() == finished_before + 2:
            break
        await asyncio.sleep(0.05)
    raw = b""
    while data := await loop.sock_recv(sock, 1 << 16):
        raw += data
    sock.close()
    await runner.cleanup()
    events = [e for e in sse_events(raw.decode(errors="replace")) if isinstance(e, dict)]
    for i, want in enumerate(expected):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [t for c in mine for t in c["token_ids"]] == want["token_ids"]
        assert mine[-1]["finish_reason"] == want["finish_reason"] == "length"
    assert max(len(e["choices"][0]["token_ids"]) for e in events if e["choices"]) > 1  # tokens coalesced


async def test_a_failed_write_is_an_info_line(keyed, caplog, monkeypatch):
    """A write that finds the client gone before aiohttp cancels the handler: INFO, not an ERROR traceback."""
    engine, url, s = keyed
    original = web.StreamResponse.write_eof

    async def flaky(self, data=b""):  # the stream's last write ([DONE] and the last chunk)
        if b"[DONE]" in data:
            raise ConnectionResetError("client gone")
        return await original(self, data)

    monkeypatch.setattr(web.StreamResponse, "write_eof", flaky)
    caplog.set_level(logging.INFO)
    async with s.post(url + "/v1/completions", json={"prompt": [5, 6], "n": 4, "stream": True, **LONG}) as r:
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await r.read()
    await wait_all_free(engine)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("went away" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("extra, status, param", [
    ({"top_k": 2**63}, 200, None),  # above any vocabulary: no filter (it once overflowed the step inputs)
    ({"top_k": 2**70}, 400, "top_k"),  # past 64 bits: the schema refuses it
    ({"stop_token_ids": [10**9], "min_tokens": 2}, 400, "stop_token_ids"),  # (once an index past the logits)
    ({"stop_token_ids": [2**70], "min_tokens": 2}, 400, "stop_token_ids"),
    ({"temperature": 1e308, "top_p": 0.5}, 200, None),
    ({"seed": 2**64 - 1}, 200, None),
])
async def test_extreme_sampling_values_never_stop_the_engine(keyed, extra, status, param):
    engine, url, s = keyed
    r = await s.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, **extra})
    body = await r.json()
    assert r.status == status, body
    if param is not None:
        assert body["error"]["param"] == param
    else:
        assert body["choices"][0]["finish_reason"] == "length"
    assert engine.healthy
    r = await s.post(url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
    assert r.status == 200 and engine.healthy


# ---- sampling parameters -----------------------------------------------------------------------------------------
def test_tiny_temperature_is_greedy(tiny_models):
    llm = LLM(str(tiny_models["llama"]), max_model_len=128)
    prompt = [[5, 6, 7, 8]]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].token_ids
    tiny = llm.generate(prompt, SamplingParams(temperature=1e-38, max_tokens=6), use_tqdm=False)[0].token_ids
    assert tiny == greedy and len(set(greedy)) > 1


async def test_params_changed_after_they_were_made_are_checked_again(keyed):
    engine, _, _ = keyed
    params = SamplingParams(max_tokens=2)
    params.top_k = 2**70
    with pytest.raises(InvalidRequestError, match="top_k"):
        await engine.generate([5, 6, 7], params)
    assert engine.healthy and (await engine.generate([5, 6], SamplingParams(max_tokens=2))).finish_reason == "length"


def test_stop_strings_are_bounded():
    SamplingParams(stop=["x" * 1024] * 16)
    with pytest.raises(InvalidRequestError, match="at most 16"):
        SamplingParams(stop=["a"] * 17)
    with pytest.raises(InvalidRequestError, match="1024 characters"):
        SamplingParams(stop=["x" * 1025])


# ---- start-up errors ---------------------------------------------------------------------------------------------
def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncllm.serve", "--log-level", "warning", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def error_lines(p: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in p.stderr, p.stderr
    return [line for line in p.stderr.splitlines() if "ERROR" in line or "error:" in line]


@pytest.fixture(scope="module")
def broken_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("truncated", "bad_json", "no_k_proj"):
        out[name] = Path(shutil.copytree(tiny_models["llama"], root / name))
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (out["bad_json"] / "config.json").write_text('{"model_type": "llama", ')
    tensors = load_file(out["no_k_proj"] / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, out["no_k_proj"] / "model.safetensors")
    return out


@pytest.mark.parametrize("case, args, status, says", [
    ("truncated", (), 1, "truncated or corrupt"),
    ("bad_json", (), 1, "config.json"),
    ("no_k_proj", (), 1, "model.layers.1.self_attn.qkv_proj.weight (part 'k')"),
    ("ok", ("--max-model-len", "-5"), 2, "--max-model-len: -5 is not in [1"),
    ("ok", ("--max-model-len", "0"), 2, "--max-model-len: 0 is not in [1"),
    ("ok", ("--port", "70000"), 2, "--port: 70000 is not in [0, 65535]"),
    ("ok", ("--api-key", ""), 1, "API key is empty"),
    ("ok", ("--max-model-len", "100000"), 1, "exceeds the model's context length"),
])
def test_misconfiguration_exits_with_one_clear_line(tiny_models, broken_models, case, args, status, says):
    model = tiny_models["llama"] if case == "ok" else broken_models[case]
    port = () if "--port" in args else ("--port", "0")  # any free port: 8000 may be taken on the test machine
    p = run_serve("--model", str(model), *port, *args)
    assert p.returncode == status, p.stderr
    lines = error_lines(p)
    assert len(lines) == 1 and says in lines[0], p.stderr


def test_busy_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model that does not exist: the port must be checked first
        p = run_serve("--model", str(tmp_path), "--port", str(port), "--load-format", "dummy")
    assert p.returncode == 1
    [line] = error_lines(p)
    assert f"127.0.0.1:{port} is already in use" in line and "--port" in line


async def test_a_burst_of_connections_is_held_while_the_loop_is_busy():
    """400 clients connect while the loop runs something else (nothing is accepted meanwhile): the kernel must
    complete every handshake, or the ones past the backlog are retried a second later (time to first token)."""
    from asyncllm.serve import bind, listen

    runner = make_runner(web.Application())
    await runner.setup()
    sock = bind("127.0.0.1", 0)
    await listen(runner, sock)
    clients = [socket.socket() for _ in range(400)]
    try:
        for c in clients:
            c.setblocking(False)
            c.connect_ex(sock.getsockname()[:2])
        time.sleep(0.3)  # blocks the loop: no accept runs
        poll = select.poll()
        for c in clients:
            poll.register(c, select.POLLOUT)
        with open("/proc/sys/net/core/somaxconn") as f:  # the kernel caps every listener's backlog there
            cap = int(f.read()) + 1
        assert len(poll.poll(0)) == min(len(clients), cap)
    finally:
        for c in clients:
            c.close()
        await runner.cleanup()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_burst_of_connections_is_accepted_in_a_few_loop_iterations(loop):
    """The loop's iterations are long while the engine steps (its work runs in them): a burst of clients must not
    wait one iteration each (libuv under uvloop accepts one connection per iteration). 100 requests sent together
    on 100 connections all reach their handler within a few iterations."""
    import uvloop

    from asyncllm.serve import bind, listen

    n = 100

    async def main() -> tuple[list[int], int]:
        iteration, seen, sent = [0], [], []

        async def handler(request: web.Request) -> web.Response:
            seen.append(iteration[0])
            return web.Response(text="ok")

        async def busy() -> None:  # a long iteration, over and over
            while True:
                time.sleep(0.005)
                iteration[0] += 1
                await asyncio.sleep(0)

        def clients(address: tuple[str, int]) -> list[bytes]:
            socks = [socket.create_connection(address) for _ in range(n)]
            for s in socks:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sent.append(iteration[0])  # every request is in the kernel from this iteration on
            replies = [s.recv(1024) for s in socks]
            for s in socks:
                s.close()
            return replies

        app = web.Application()
        app.router.add_get("/", handler)
        runner = make_runner(app)
        await runner.setup()
        sock = bind("127.0.0.1", 0)
        await listen(runner, sock)
        task = asyncio.create_task(busy())
        try:
            replies = await asyncio.get_running_loop().run_in_executor(None, clients, sock.getsockname()[:2])
        finally:
            task.cancel()
            await runner.cleanup()
        assert all(r.startswith(b"HTTP/1.1 200") for r in replies)
        assert sock.fileno() == -1, "the listening socket stays open after cleanup"
        return seen, sent[0]

    seen, sent = (uvloop.run if loop == "uvloop" else asyncio.run)(main())
    assert len(seen) == n
    # once all are sent, the rest are taken in an iteration or two; one connection per iteration would take the
    # ~n not accepted yet (however slowly the clients connected)
    assert max(seen) - sent < n // 5, (sent, seen)


async def test_a_failed_accept_pauses_accepting_then_takes_the_connection(caplog):
    """accept() failing (out of descriptors: the connection stays queued) logs a warning and pauses accepting, so
    the still-readable socket does not spin the loop; the connection is taken once accepting resumes."""
    from asyncllm.server import listener

    class Flaky(socket.socket):
        failures = 1

        def accept(self):  # noqa: ANN202
            if Flaky.failures:
                Flaky.failures -= 1
                raise OSError(24, "Too many open files")
            return super().accept()

    made = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.set_result(transport)

    sock = Flaky(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = listener.BurstListener(asyncio.get_running_loop(), sock, Probe)
    client = socket.create_connection(sock.getsockname())
    try:
        transport = await asyncio.wait_for(made, 5 * listener.PAUSE_S + 5)
        transport.close()
        assert Flaky.failures == 0 and any("pausing accepts" in r.getMessage() for r in caplog.records)
    finally:
        client.close()
        server.close()
    assert sock.fileno() == -1


def test_help_never_prints_the_api_key():
    p = run_serve("--help", env={"ASYNCLLM_API_KEY": "topsecret-123"})
    assert p.returncode == 0 and "topsecret-123" not in p.stdout and "ASYNCLLM_API_KEY" in p.stdout


def test_damaged_cached_default_model_is_converted_again(smollm2_dir, tmp_path, monkeypatch):
    from asyncllm.model_files import DEFAULT_MODEL_NAME, damaged, default_model_dir

    cached = tmp_path / DEFAULT_MODEL_NAME.lower()
    shutil.copytree(smollm2_dir, cached)
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("ASYNCLLM_CACHE", str(tmp_path))
    assert damaged(cached) is not None
    assert default_model_dir() == cached and damaged(cached) is None
    assert weights.stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size


# ---- weights -----------------------------------------------------------------------------------------------------
def test_every_part_of_a_merged_weight_must_be_loaded(broken_models):
    with pytest.raises(ModelLoadError, match=r"qkv_proj.weight \(part 'k'\)"):
        LLM(str(broken_models["no_k_proj"]), max_model_len=64)


def test_a_weight_loaded_twice_is_refused(tiny_models):
    from asyncllm.models.loader import iter_safetensors

    llm = LLM(str(tiny_models["llama"]), max_model_len=64)
    twice = list(iter_safetensors(tiny_models["llama"]))
    twice.append(next(kv for kv in twice if kv[0].endswith("v_proj.weight")))
    with pytest.raises(ModelLoadError, match="loaded twice"):
        llm.engine.runner.model.load_weights(iter(twice))


# ---- close() -----------------------------------------------------------------------------------------------------
def test_close_and_del_free_the_engine(tiny_models):
    gc.disable()  # nothing may depend on the cycle collector
    try:
        llm = LLM(str(tiny_models["llama"]), max_model_len=64)
        runner, kv = weakref.ref(llm.engine.runner), weakref.ref(llm.engine.runner.kv_cache)
        del llm
        assert runner() is None and kv() is None
    finally:
        gc.enable()
    with LLM(str(tiny_models["llama"]), max_model_len=64) as llm:
        assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids
    assert llm.engine.runner.kv_cache is None
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[5, 6]], use_tqdm=False)


def test_a_failed_step_reports_its_own_error(tiny_models):
    llm = LLM(str(tiny_models["llama"]), max_model_len=64)

    def boom(batch, broadcast=True):
        raise RuntimeError("simulated device failure")

    llm.engine.runner.launch = boom
    with pytest.raises(RuntimeError, match="simulated device failure"):
        llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=4), use_tqdm=False)


# ---- the shell ---------------------------------------------------------------------------------------------------
class Terminal:
    """The shell in a subprocess, read as it prints (its prompt has no newline)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncllm.shell", "--log-level", "warning", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b""

    def wait_for(self, done, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        """Read output until done(output) holds."""
        end = time.monotonic() + timeout
        while not done(self.out):
            assert time.monotonic() < end, self.out.decode(errors="replace")
            if select.select([self.proc.stdout], [], [], 0.1)[0]:
                data = os.read(self.proc.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
                assert data, "the shell exited: " + self.out.decode(errors="replace")
                self.out += data

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]


def test_shell_ctrl_c_stops_the_reply_then_exits_at_the_prompt(long_model):
    term = Terminal("--model", str(long_model), "--max-tokens", "50000", "--max-model-len", "100000")
    try:
        term.wait_for(lambda out: out.endswith(b"> "))
        term.send("Tell me a very long story")
        mark = len(term.out)
        term.wait_for(lambda out: len(out) > mark + 200)  # the reply is streaming
        term.proc.send_signal(signal.SIGINT)
        term.wait_for(lambda out: b"[interrupted]\n> " in out)
        assert term.proc.poll() is None  # back at the prompt, not gone
        term.send("/reset")
        term.wait_for(lambda out: b"(conversation cleared)" in out)
        term.proc.send_signal(signal.SIGINT)  # at the prompt: leave at once
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.proc.kill()


def test_shell_help_lists_its_own_flags():
    p = subprocess.run([sys.executable, "-m", "asyncllm.shell", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--max-tokens" in p.stdout and "--system" in p.stdout
    assert "--port" not in p.stdout and "--api-key" not in p.stdout and "OpenAI" not in p.stdout


async def test_tokenizer_queue_is_bounded(keyed, monkeypatch):
    import asyncllm.engine.async_engine as ae

    engine, url, s = keyed
    monkeypatch.setattr(ae, "MAX_PENDING_TOKENIZATIONS", 2)
    gate = __import__("threading").Event()
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: gate.wait(10) and [5])
    waiting = [asyncio.create_task(s.post(url + "/tokenize", json={"prompt": "hi"})) for _ in range(2)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while engine._tokenizing < 2 and loop.time() < deadline:  # both are inside the tokenizer
        await asyncio.sleep(0.01)
    r = await s.post(url + "/tokenize", json={"prompt": "hi"})
    assert r.status == 503 and (await r.json())["error"]["code"] == "overloaded"
    gate.set()
    assert [(await t).status for t in waiting] == [200, 200]
