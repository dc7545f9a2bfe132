"""aiohttp application: OpenAI-compatible routes over an AsyncEngine's public API.

Every request is validated (schema, model name, context length) before anything is queued; errors use OpenAI's
envelope {"error": {"message", "type", "param", "code"}}. Streams are SSE; a client that goes away cancels its
handler (aiohttp handler_cancellation), which closes its engine streams and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import hmac
import zlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from asyncllm import __version__
from asyncllm.engine.async_engine import AsyncEngine, StreamChunk
from asyncllm.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError
from asyncllm.sampling_params import SamplingParams
from asyncllm.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
MAX_CHOICES = 1024  # prompts x n in one request
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)  # a request body's limit, also once decompressed


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return json_response(self.body(), self.status)


def aborted() -> ApiError:
    """A request ended by AsyncEngine.abort from elsewhere: an error, never a normal finish."""
    return ApiError(503, "the request was aborted before it finished", "service_unavailable")


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                     413: "invalid_request_error", 415: "invalid_request_error"}


def api_error(e: Exception) -> ApiError:
    """The OpenAI-style error for an exception raised while serving a request."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, EngineDeadError):
        return ApiError(503, str(e), "service_unavailable")
    if isinstance(e, EngineOverloadedError):
        return ApiError(503, str(e), "service_unavailable", code="overloaded")
    if isinstance(e, web.HTTPException):
        return ApiError(e.status, e.text or e.reason, _HTTP_ERROR_TYPES.get(e.status, "invalid_request_error"),
                        code=e.status)
    return ApiError(500, "internal server error", "server_error")


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return api_error(e).response()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        if not isinstance(e, (ApiError, InvalidRequestError, EngineDeadError, EngineOverloadedError)):
            log.exception("unhandled error in %s %s", request.method, request.path)
        return api_error(e).response()


# routes that do no work on the caller's behalf stay open with --api-key (probes and scrapers)
OPEN_ROUTES = frozenset({"/health", "/metrics", "/version"})


def auth_middleware(api_key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    if not api_key:
        raise ValueError("an empty API key would let anyone in")
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path not in OPEN_ROUTES:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               "authentication_error", code="invalid_api_key")
        return await handler(request)

    return check


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent with `Content-Encoding` (the runner leaves decompression to us, so a bad body is a 400
    here rather than an error inside aiohttp's parser); at most `limit` bytes once decompressed."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)",
                       param="Content-Encoding")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS)
    try:
        body = decoder.decompress(raw, limit + 1)
    except zlib.error as e:
        raise ApiError(400, f"the request body is not valid {encoding} data ({e})", param="Content-Encoding") from None
    if len(body) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes once decompressed")
    if not decoder.eof:
        raise ApiError(400, f"the request body is truncated {encoding} data", param="Content-Encoding")
    return body


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The AppRunner the server needs: handlers cancelled when their client goes away (frees KV blocks), request
    bodies left compressed for `parse` to decode."""
    return web.AppRunner(app, handler_cancellation=True, auto_decompress=False, **kwargs)


async def parse(request: web.Request, schema: type[M]) -> M:
    raw = await request.read()  # raises 413 past client_max_size
    raw = decode_body(raw, request.headers.get("Content-Encoding", ""), request.app[MAX_BODY_BYTES])
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=str(err["loc"][0]) if err["loc"] else None) from None


async def merged(streams: list[AsyncIterator[StreamChunk]]) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(index, chunk) from several streams as they come; leaving early closes all of them."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for chunk in only:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, StreamChunk | None, BaseException | None]] = asyncio.Queue(maxsize=2 * len(streams))

    async def pump(i: int, stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for chunk in s:
                    await queue.put((i, chunk, None))
            await queue.put((i, None, None))
        except Exception as e:
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                remaining -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServer:
    """Route handlers. Knows the engine only through AsyncEngine's public methods."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings

    # ---- helpers --------------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _check_accepting(self) -> None:
        if not self.engine.healthy:
            raise ApiError(503, f"the engine is not running: {self.engine.error}", "service_unavailable")
        if not self.engine.accepting:
            raise ApiError(503, "the server is shutting down", "service_unavailable")

    def _usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    async def _prepare(self, prompts: list[Any], body: Any, default_max_tokens: int | None
                       ) -> tuple[list[list[int]], list[tuple[list[int], SamplingParams]]]:
        """Tokenize and validate everything; returns the prompts' ids and one (ids, params) per choice."""
        self._check_accepting()
        if len(prompts) * body.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices", param="n")
        encoded = [await self.engine.encode(p) for p in prompts]
        jobs = []
        for ids in encoded:
            for j in range(body.n):
                params = body.sampling_params(default_max_tokens, j)
                self.engine.check(ids, params)
                jobs.append((ids, params))
        return encoded, jobs

    # ---- generation -----------------------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        encoded, jobs = await self._prepare([messages], body, None)
        return await self._generate(request, body, encoded, jobs, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse(request, CompletionRequest)
        self._check_model(body.model)
        encoded, jobs = await self._prepare(body.prompts(), body, 16)
        return await self._generate(request, body, encoded, jobs, chat=False)

    async def _generate(self, request: web.Request, body: Any, encoded: list[list[int]],
                        jobs: list[tuple[list[int], SamplingParams]], chat: bool) -> web.StreamResponse:
        streams = [self.engine.stream(ids, params) for ids, params in jobs]
        prompt_tokens = sum(len(ids) for ids in encoded)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.settings.served_model_name}
        if body.stream:
            return await self._sse(request, body, streams, meta, prompt_tokens, chat)
        texts = [[] for _ in jobs]  # type: list[list[str]]
        ids: list[list[int]] = [[] for _ in jobs]
        finish: list[str | None] = [None] * len(jobs)
        completion_tokens = cached_tokens = 0
        async with aclosing(merged(streams)) as chunks:  # leaving early aborts every choice's request
            async for i, chunk in chunks:
                texts[i].append(chunk.text)
                ids[i].extend(chunk.token_ids)
                completion_tokens += len(chunk.token_ids)
                finish[i] = chunk.finish_reason or finish[i]
                if chunk.usage is not None and i % body.n == 0:  # a prompt's cache hit counts once, like its tokens
                    cached_tokens += chunk.usage.cached_tokens
                if chunk.finish_reason == "abort":
                    raise aborted()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "logprobs": None,
                        "finish_reason": finish[i]} for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": finish[i]}
                       for i, t in enumerate(texts)]
        if body.return_token_ids:
            for c, token_ids in zip(choices, ids):
                c["token_ids"] = token_ids
        return json_response({**meta, "object": "chat.completion" if chat else "text_completion",
                              "choices": choices, "usage": self._usage(prompt_tokens, completion_tokens, cached_tokens)})

    async def _sse(self, request: web.Request, body: Any, streams: list[AsyncIterator[StreamChunk]],
                   meta: dict[str, Any], prompt_tokens: int, chat: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def send(payload: Any) -> None:
            await resp.write(b"data: " + orjson.dumps(payload) + b"\n\n")

        def choice(i: int, text: str, finish_reason: str | None, first: bool = False,
                   token_ids: list[int] | None = None) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                out = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                out = {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
            if body.return_token_ids and not first:
                out["token_ids"] = token_ids or []
            return out

        completion_tokens = cached_tokens = 0
        try:
            try:
                async with aclosing(merged(streams)) as chunks:  # leaving early aborts every choice's request
                    if chat:  # the first chunk of each choice announces the role
                        for i in range(len(streams)):
                            await send({**meta, "object": obj, "choices": [choice(i, "", None, first=True)], **extra})
                    async for i, chunk in chunks:
                        completion_tokens += len(chunk.token_ids)
                        if chunk.usage is not None and i % body.n == 0:
                            cached_tokens += chunk.usage.cached_tokens
                        if chunk.finish_reason == "abort":
                            raise aborted()
                        if chunk.text or chunk.finish_reason or (body.return_token_ids and chunk.token_ids):
                            payload = choice(i, chunk.text, chunk.finish_reason, token_ids=chunk.token_ids)
                            await send({**meta, "object": obj, "choices": [payload], **extra})
                if include_usage:
                    await send({**meta, "object": obj, "choices": [],
                                "usage": self._usage(prompt_tokens, completion_tokens, cached_tokens)})
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as e:  # headers are sent: the error goes into the stream, never a normal finish
                log.warning("stream %s ended with an error: %s", meta["id"], e)
                await send(api_error(e).body())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # a write found the client gone (before aiohttp cancelled this handler)
            log.info("stream %s: the client went away", meta["id"])
        return resp

    # ---- other routes ---------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [{
            "id": self.settings.served_model_name, "object": "model", "created": int(time.time()),
            "owned_by": "asyncllm", "max_model_len": self.engine.max_model_len}]})

    async def health(self, request: web.Request) -> web.Response:
        self._check_accepting()
        return json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.engine.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": __version__})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await parse(request, TokenizeRequest)
        self._check_model(body.model)
        if body.messages is not None:
            ids = await self.engine.encode([m.as_template_message() for m in body.messages])
        else:
            ids = await self.engine.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return json_response({"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await parse(request, DetokenizeRequest)
        self._check_model(body.model)
        return json_response({"prompt": await self.engine.decode(body.tokens)})


def build_app(engine: AsyncEngine, settings: ServerSettings) -> web.Application:
    middlewares = [error_middleware] + ([auth_middleware(settings.api_key)] if settings.api_key is not None else [])
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[MAX_BODY_BYTES] = settings.max_body_bytes
    s = OpenAIServer(engine, settings)
    app.router.add_post("/v1/chat/completions", s.chat_completions)
    app.router.add_post("/v1/completions", s.completions)
    app.router.add_get("/v1/models", s.models)
    app.router.add_get("/health", s.health)
    app.router.add_get("/metrics", s.metrics)
    app.router.add_get("/version", s.version)
    app.router.add_post("/tokenize", s.tokenize)
    app.router.add_post("/detokenize", s.detokenize)
    return app


__all__ = ["ApiError", "ServerSettings", "build_app", "make_runner"]
