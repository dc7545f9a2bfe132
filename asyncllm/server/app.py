"""aiohttp application: OpenAI-compatible routes over an AsyncEngine's public API.

Every request is validated (schema, model name, context length) before anything is queued; errors use OpenAI's
envelope {"error": {"message", "type", "param", "code"}}. Streams are SSE; a client that goes away cancels its
handler (aiohttp handler_cancellation), which closes its engine streams and frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import zlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
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
from asyncllm.server.choices import Choices, SSEChoices, sse_event
from asyncllm.server.logprobs import LogprobFormatter
from asyncllm.server.send_thread import SendThread, native_library
from asyncllm.server.tools import ToolCallParser, template_messages
from asyncllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    unimplemented_field,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
MAX_CHOICES = 1024  # prompts x n in one request
_MARK = "\x00asyncllm-text\x00"  # stands for a chunk's text in a pre-serialized SSE event (JSON escapes it)
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)  # a request body's limit, also once decompressed
ALLOWED_ORIGINS = web.AppKey("allowed_origins", object)
# apply_chat_template arguments the server sets itself
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize", "return_dict", "return_tensors",
                                      "add_generation_prompt", "continue_final_message", "tools", "tokenizer"})


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    allowed_origins: list[str] | None = None  # CORS: origins whose browsers may call the API ("*": any)
    send_thread: bool = True  # streamed chunks reach their sockets through a native thread (send_thread.py)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return json_response(self.body(), self.status)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                     413: "invalid_request_error", 415: "invalid_request_error", 503: "service_unavailable"}


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


def _cors_origin(origins: list[str] | None, request: web.Request) -> str | None:
    """The Access-Control-Allow-Origin value for this request, or None (no CORS, or an origin not allowed)."""
    origin = request.headers.get("Origin")
    if not origins or origin is None or not ("*" in origins or origin in origins):
        return None
    return "*" if "*" in origins else origin


def cors_middleware(origins: list[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Browsers' preflight OPTIONS from allowed origins, answered here (before auth: they carry no credentials)."""

    @web.middleware
    async def cors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        allow = _cors_origin(origins, request)
        if allow is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allow, "Vary": "Origin", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*")})
        return await handler(request)

    return cors


async def _cors_on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every response to an allowed origin (streams included: their headers go out before a middleware could
    touch them) says so."""
    allow = _cors_origin(request.app[ALLOWED_ORIGINS], request)  # type: ignore[arg-type]
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Vary"] = "Origin"


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
    if schema in (ChatCompletionRequest, CompletionRequest) and \
            (field := unimplemented_field(data, chat=schema is ChatCompletionRequest)) is not None:
        raise ApiError(400, f"{field} is not supported by this server", param=field)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{loc}: {msg}" if loc else msg, param=str(err["loc"][0]) if err["loc"] else None) from None


class OpenAIServer:
    """Route handlers. Knows the engine only through AsyncEngine's public methods."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings
        self.sender: SendThread | None = None

    async def start_sender(self, app: web.Application) -> None:
        if self.settings.send_thread and (lib := native_library()) is not None:
            self.sender = SendThread(lib, asyncio.get_running_loop())

    async def stop_sender(self, app: web.Application) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

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

    async def _prepare(self, prompts: list[Any], body: Any, default_max_tokens: int | None,
                       chat: dict[str, Any] | None = None) -> tuple[list[list[int]], list[tuple[list[int], SamplingParams]]]:
        """Tokenize and validate everything; returns the prompts' ids and one (ids, params) per choice."""
        self._check_accepting()
        if len(prompts) * body.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} asks for more than {MAX_CHOICES} choices", param="n")
        special = getattr(body, "add_special_tokens", True)  # (completions; chat templates write their own)
        encoded = [await self.engine.encode(p, special, chat=chat) for p in prompts]
        jobs = []
        for ids in encoded:
            for j in range(body.n):
                params = body.sampling_params(default_max_tokens, j, self.engine.sampling_defaults)
                await self.engine.compile_grammar(params)
                jobs.append((ids, params))
        if len(jobs) > 1:  # every choice valid before one is queued (a single one is checked as it opens)
            for ids, params in jobs:
                self.engine.check(ids, params)
        return encoded, jobs

    # ---- generation -----------------------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        tools = body.tool_dicts
        has_tools = self.engine.template_has_tools
        messages = template_messages([m.as_template_message() for m in body.messages], tools, has_tools)
        kwargs = body.chat_template_kwargs or {}
        if reserved := sorted(set(kwargs) & RESERVED_TEMPLATE_KWARGS):
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        chat = {**kwargs, "add_generation_prompt": body.add_generation_prompt,
                "continue_final_message": body.continue_final_message, **({"tools": tools} if tools and has_tools else {})}
        encoded, jobs = await self._prepare([messages], body, None, chat)
        return await self._generate(request, body, encoded, jobs, chat=True)

    @staticmethod
    def _tool_parser(body: Any) -> ToolCallParser | None:
        """A parser of the model's tool calls for one choice, or None (no tools, or tool_choice "none")."""
        if not isinstance(body, ChatCompletionRequest) or not body.tools or body.tool_choice_value == "none":
            return None
        choice = body.tool_choice_value
        names = frozenset(t["function"]["name"] for t in body.tool_dicts)
        if isinstance(choice, dict):
            return ToolCallParser("named", names, choice["function"]["name"])
        return ToolCallParser(choice, names, max_calls=None if body.parallel_tool_calls else 1)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await parse(request, CompletionRequest)
        self._check_model(body.model)
        prompts = body.prompts()
        encoded, jobs = await self._prepare(prompts, body, 16)
        echo = None
        if body.echo:  # each prompt's text as given (token-id prompts decoded), before each of its choices
            echo = [p if isinstance(p, str) else await self.engine.decode(p) for p in prompts]
        return await self._generate(request, body, encoded, jobs, chat=False, echo=echo)

    def _logprobs(self, body: Any, chunk: StreamChunk, prompt_ids: list[int], offset: int, echo: str | None
                  ) -> tuple[dict[str, Any] | None, int]:
        """A choice's `logprobs` for one chunk (None when not asked for), and the completion's next text offset.
        Echo: `offset` is where the chunk's text begins after the prompt's text (its first chunk only)."""
        fmt = self.formatter
        if chunk.logprobs is None:
            return None, offset
        if isinstance(body, ChatCompletionRequest):
            return fmt.chat(chunk.logprobs), offset
        if echo is not None and chunk.prompt_logprobs is not None:
            head, _ = fmt.prompt_completion(prompt_ids, chunk.prompt_logprobs)
            tail, offset = fmt.completion(chunk.logprobs, len(echo))
            return {k: head[k] + tail[k] for k in head}, offset
        return fmt.completion(chunk.logprobs, offset)

    @functools.cached_property
    def formatter(self) -> LogprobFormatter:
        return LogprobFormatter(self.engine.tokenizer)

    async def _generate(self, request: web.Request, body: Any, encoded: list[list[int]],
                        jobs: list[tuple[list[int], SamplingParams]], chat: bool, echo: list[str] | None = None
                        ) -> web.StreamResponse:
        prompt_tokens = sum(len(ids) for ids in encoded)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.settings.served_model_name}
        if body.stream:
            return await self._sse(request, body, jobs, meta, prompt_tokens, chat, echo)
        choices = Choices(self.engine, jobs)
        try:
            outs = await choices.collect()
        finally:
            choices.close()  # leaving early aborts every choice's request
        completion_tokens = sum(len(o.token_ids) for o in outs)
        cached_tokens = sum(o.usage.cached_tokens for o in outs[:: body.n] if o.usage)  # a prompt's hit counts once
        prefix = [echo[i // body.n] if echo is not None else None for i in range(len(outs))]
        logprobs = [self._logprobs(body, o, ids, 0, p)[0] for o, (ids, _), p in zip(outs, jobs, prefix)]
        if chat:
            out = []
            for i, (o, lp) in enumerate(zip(outs, logprobs)):
                message: dict[str, Any] = {"role": "assistant", "content": o.text}
                finish_reason = o.finish_reason
                if (parser := self._tool_parser(body)) is not None:
                    head, _ = parser.feed(o.text)
                    tail, _ = parser.finish()
                    if parser.calls:
                        message = {"role": "assistant", "content": (head + tail) or None, "tool_calls": parser.calls}
                        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
                out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish_reason})
        else:
            out = [{"index": i, "text": (p or "") + o.text, "logprobs": lp, "finish_reason": o.finish_reason}
                   for i, (o, lp, p) in enumerate(zip(outs, logprobs, prefix))]
        if body.return_token_ids:
            for c, o in zip(out, outs):
                c["token_ids"] = o.token_ids
        return json_response({**meta, "object": "chat.completion" if chat else "text_completion",
                              "choices": out, "usage": self._usage(prompt_tokens, completion_tokens, cached_tokens)})

    async def _sse(self, request: web.Request, body: Any, jobs: list[tuple[list[int], SamplingParams]],
                   meta: dict[str, Any], prompt_tokens: int, chat: bool, echo: list[str] | None) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        head = {**meta, "object": obj}
        offsets = [0] * len(jobs)  # completions with logprobs: each choice's text offset so far
        unechoed = set(range(len(jobs))) if echo is not None else set()  # choices whose prompt is still to send

        def choice(i: int, text: str, finish_reason: str | None, token_ids: list[int] | None = None,
                   logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
            if chat:
                delta = {"content": text} if text else {}
                out = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            else:
                out = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            if token_ids is not None:
                out["token_ids"] = token_ids
            return out

        parsers = [self._tool_parser(body) for _ in jobs]  # tool calls: each choice's text goes through its parser

        def plain_frame(i: int) -> tuple[bytes, bytes] | None:
            """The bytes around the JSON text of choice i's events before its last, when those carry text only
            (no tool calls, log-probabilities, echo or token ids): one event serialized with a marker for the text."""
            if parsers[i] is not None or jobs[i][1].logprobs is not None or echo is not None or body.return_token_ids:
                return None
            before, after = sse_event({**head, "choices": [choice(i, _MARK, None)], **extra}).split(orjson.dumps(_MARK))
            return before, after

        plain = [plain_frame(i) for i in range(len(jobs))]

        def tool_frame(i: int, chunk: StreamChunk, parser: ToolCallParser) -> bytes:
            text, calls = parser.feed(chunk.text)
            finish_reason = chunk.finish_reason
            if finish_reason is not None:
                tail, more = parser.finish()
                text, calls = text + tail, calls + more
                if parser.calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            delta: dict[str, Any] = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = calls
            lp, offsets[i] = self._logprobs(body, chunk, jobs[i][0], offsets[i], None)
            if not delta and finish_reason is None and lp is None:
                return b""
            out = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            if body.return_token_ids:
                out["token_ids"] = chunk.token_ids
            return sse_event({**head, "choices": [out], **extra})

        def frame(i: int, chunk: StreamChunk) -> bytes:  # inside the engine loop; plain choices' last chunk only
            if (parser := parsers[i]) is not None:
                return tool_frame(i, chunk, parser)
            if chunk.logprobs is not None or i in unechoed:
                text, prefix = chunk.text, None
                if i in unechoed:
                    unechoed.discard(i)
                    prefix = echo[i // body.n]  # type: ignore[index]
                    text = prefix + text
                    offsets[i] = len(prefix)
                lp, offsets[i] = self._logprobs(body, chunk, jobs[i][0], offsets[i], prefix)
                ids = chunk.token_ids if body.return_token_ids else None
                return sse_event({**head, "choices": [choice(i, text, chunk.finish_reason, ids, lp)], **extra})
            if not (chunk.text or chunk.finish_reason or (body.return_token_ids and chunk.token_ids)):
                return b""
            ids = chunk.token_ids if body.return_token_ids else None
            return sse_event({**head, "choices": [choice(i, chunk.text, chunk.finish_reason, ids)], **extra})

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        choices = SSEChoices(self.engine, jobs, frame, plain, self.sender)
        try:
            await resp.prepare(request)
            end = b"data: [DONE]\n\n"  # written with the usage (or an error) and the last chunk in one write
            try:
                first = b""
                if chat:  # the first chunk of each choice announces the role
                    first = b"".join(sse_event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                      "logprobs": None, "finish_reason": None}], **extra})
                                     for i in range(len(jobs)))
                await choices.stream(request, resp, first)
                if include_usage:  # a prompt's cached tokens count once (its first choice's)
                    completion = sum(c.usage.completion_tokens for c in choices.streams)
                    cached = sum(c.usage.cached_tokens for c in choices.streams[:: body.n])
                    end = sse_event({**head, "choices": [], "usage": self._usage(prompt_tokens, completion, cached)}) + end
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception as e:  # headers are sent: the error goes into the stream, never a normal finish
                log.warning("stream %s ended with an error: %s", meta["id"], e)
                end = sse_event(api_error(e).body()) + end
            await resp.write_eof(end)
        except ConnectionResetError:  # a write found the client gone (before aiohttp cancelled this handler)
            log.info("stream %s: the client went away", meta["id"])
        finally:
            choices.close()  # leaving early aborts every choice's request
        return resp

    # ---- other routes ---------------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.settings.served_model_name, "object": "model", "created": int(time.time()),
                "owned_by": "asyncllm", "max_model_len": self.engine.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return json_response(self._model_card())

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
    if settings.allowed_origins:
        middlewares.insert(0, cors_middleware(settings.allowed_origins))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[MAX_BODY_BYTES] = settings.max_body_bytes
    app[ALLOWED_ORIGINS] = settings.allowed_origins
    if settings.allowed_origins:
        app.on_response_prepare.append(_cors_on_prepare)
    s = OpenAIServer(engine, settings)
    app.on_startup.append(s.start_sender)
    app.on_cleanup.append(s.stop_sender)
    app.router.add_post("/v1/chat/completions", s.chat_completions)
    app.router.add_post("/v1/completions", s.completions)
    app.router.add_get("/v1/models", s.models)
    app.router.add_get("/v1/models/{model}", s.model)
    app.router.add_get("/health", s.health)
    app.router.add_get("/metrics", s.metrics)
    app.router.add_get("/version", s.version)
    app.router.add_post("/tokenize", s.tokenize)
    app.router.add_post("/detokenize", s.detokenize)
    return app


__all__ = ["ApiError", "ServerSettings", "build_app", "make_runner"]
