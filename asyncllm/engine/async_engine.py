"""AsyncEngine: the engine as a coroutine inside any asyncio program.

One loop coroutine owns the scheduler. With a GPU, each iteration on the loop thread: apply aborts -> schedule step
N+1 -> launch it on the GPU's side stream (queued behind step N; launching never waits on the GPU) -> deliver step
N-1's tokens (detokenize, stop strings, consumers' writes; before the launch when step N+1 has prompt tokens, whose
launch takes the host milliseconds: the tokens do not wait for it) -> in the step thread, wait on a CUDA event for
step N -> append step N's tokens. So the host's part of the GPU's critical path (from a step's end to the launch of
the one after the next) is the append, the scheduling and the launch, with no hand-off between threads in it;
delivery and the HTTP handlers run while the GPU works, and the loop thread is the only one that runs Python then
(the step thread sleeps on the event). A request a stop string ended may compute a token or two more, which nobody
sees.
Without a GPU the step thread computes each step (`EngineCore.advance`) and its tokens are delivered at once;
with overlap off, the step launched is the one waited for. Everything that touches the scheduler runs on the loop,
so aborts and stop-string finishes that arrive meanwhile are applied at the start of the next iteration.

Delivery is coalescing: a consumer that reads slowly gets several tokens in one chunk, and a request buffers at
most its own output (no per-token queue grows behind a slow client).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from asyncllm.config import EngineConfig
from asyncllm.engine.core import EngineCore
from asyncllm.engine.detokenizer import IncrementalDetokenizer
from asyncllm.engine.request import Request, RequestStatus
from asyncllm.errors import (
    AsyncLLMError,
    EngineDeadError,
    EngineOverloadedError,
    EngineShutdownError,
    InvalidRequestError,
)
from asyncllm.metrics import EngineMetrics
from asyncllm.outputs import GenerateOutput, Logprob
from asyncllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# prompts that may wait for the tokenizer pool at once; more are refused (EngineOverloadedError, HTTP 503)
MAX_PENDING_TOKENIZATIONS = 1024

Messages = Sequence[dict[str, Any]]
PromptInput = str | list[int] | Messages


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamChunk:
    request_id: str
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids since the previous chunk
    finish_reason: str | None = None  # set on the last chunk: "stop" | "length" | "abort"
    usage: Usage | None = None  # set on the last chunk
    logprobs: list[Logprob] | None = None  # one per token id of this chunk (SamplingParams.logprobs)
    prompt_logprobs: list[Logprob | None] | None = None  # on the first chunk (SamplingParams.prompt_logprobs)


Notify = Callable[["RequestStream"], None]


class TextSink(Protocol):
    """A consumer that takes a stream's new text as it comes (one call per token), instead of being notified and
    taking it: the path of plain text streaming, with nothing per token but the text. Set as
    `RequestStream.sink = (sink, key)`; the engine uses it for a token that is not the first and does not end the
    request, while `direct` is true, with `stream_interval` 1 and the text not held back (stop strings)."""

    direct: bool

    def write_text(self, key: Any, text: str) -> None: ...


class RequestStream:
    """Delivery state of one request, touched only on the event-loop thread. The engine calls `notify(stream)`
    synchronously, inside its loop, whenever there is something to `take()`: new tokens (every
    `stream_interval` tokens, the first at once), the finish, or an error. Tokens not taken yet accumulate here,
    so a slow consumer gets them in one chunk and a request buffers at most its own output."""

    __slots__ = ("req", "detok", "notify", "new_ids", "finish_reason", "error", "t_arrival", "t_last", "num_tokens",
                 "num_taken", "sink")

    def __init__(self, req: Request, detok: IncrementalDetokenizer | None, notify: Notify) -> None:
        self.req, self.detok, self.notify = req, detok, notify
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.t_arrival = self.t_last = req.arrival_time  # time.monotonic() when the request was made
        self.num_tokens = 0  # output tokens delivered to this stream
        self.num_taken = -1  # output tokens taken (-1: nothing taken yet)
        self.sink: tuple[TextSink, Any] | None = None  # the consumer's direct text path, and its key for this stream

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def raise_error(self) -> None:
        """Raise the error that ended this request, if any (an AsyncLLMError, or EngineDeadError)."""
        if self.error is not None:
            if isinstance(self.error, AsyncLLMError):
                raise self.error
            raise EngineDeadError(f"the engine failed: {self.error}") from self.error

    @property
    def usage(self) -> Usage:
        """Token counts so far (the last chunk carries them once the request finished)."""
        req = self.req
        return Usage(req.num_prompt_tokens, self.num_tokens, max(0, req.num_cached_tokens))

    def take(self) -> StreamChunk:
        """Everything not taken yet; the last chunk (finish_reason set) once the request finished."""
        final = self.done
        req = self.req
        text = self.detok.take(final) if self.detok is not None else ""
        ids, self.new_ids = self.new_ids, []
        chunk = StreamChunk(req.request_id, text, ids, self.finish_reason if final else None,
                            self.usage if final else None)
        taken, self.num_taken = self.num_taken, self.num_tokens
        if req.output_logprobs is not None:
            chunk.logprobs = req.output_logprobs[max(taken, 0) : self.num_tokens]
        if taken < 0 and req.prompt_logprobs is not None:
            chunk.prompt_logprobs = req.prompt_logprobs
        return chunk

    def take_text(self) -> str:
        """`take().text` of a stream that is not done, for a consumer of its text only (it drops the token ids
        and log-probabilities): the per-token path of plain streaming, without building a chunk."""
        self.new_ids.clear()
        self.num_taken = self.num_tokens
        return self.detok.take(False) if self.detok is not None else ""


class AsyncEngine:
    """`async with AsyncEngine(model=None, **config) as engine: async for chunk in engine.stream(prompt, params)`."""

    # launch steps from the loop thread (see the module's docstring); None: when they run on a CUDA stream
    launch_on_loop: bool | None = None

    def __init__(self, model: str | None = None, **config: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **config)
        self.core: EngineCore | None = None
        self.error: BaseException | None = None  # set when the loop died
        self._streams: dict[str, RequestStream] = {}  # requests not done yet
        self._deferred: dict[str, str] = {}  # request id -> finish reason, applied between steps
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # the loop exits
        self._accepting = True  # new requests are admitted (False from the start of shutdown)
        self._drain_until = 0.0  # loop time until which shutdown lets requests in flight finish
        self._shutdown: asyncio.Future[None] | None = None
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="asyncllm-tokenize")
        self._tokenizing = 0  # prompts queued in or running on the tokenizer pool
        self._step_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncllm-step")
        self.metrics = EngineMetrics(self._gauges, self.config.model_name)
        self.loop_lag = 0.0  # seconds; updated by whoever probes the loop (the server)
        self._last_counts = (0, 0, 0, 0, 0)

    # ---- life cycle -----------------------------------------------------------------------------------------
    async def start(self) -> "AsyncEngine":
        if self._task is None:
            loop = asyncio.get_running_loop()
            self.core = await loop.run_in_executor(self._step_pool, EngineCore, self.config)
            self._task = asyncio.create_task(self._run(), name="asyncllm-engine-loop")
        return self

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop the engine. New requests are refused at once (`EngineShutdownError`); requests in flight may
        finish for up to `timeout` seconds; every one still unfinished then ends with `EngineShutdownError` raised
        from its stream (never a normal finish). `async with` exits with timeout 0. Idempotent."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._stop(timeout))
        await asyncio.shield(self._shutdown)

    async def _stop(self, timeout: float) -> None:
        self._accepting = False
        loop = asyncio.get_running_loop()
        self._drain_until = loop.time() + timeout
        while self.healthy and self._streams and loop.time() < self._drain_until:
            await asyncio.sleep(0.01)
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for stream in list(self._streams.values()):
            self._fail(stream, EngineShutdownError("the engine shut down before this request finished"))
            self.metrics.finished("abort")
        if self.core is not None:
            await loop.run_in_executor(self._step_pool, self.core.shutdown)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._step_pool.shutdown(wait=True)

    def stop_draining(self) -> None:
        """Cut a shutdown's grace period short (e.g. a second SIGTERM): unfinished requests end now."""
        self._drain_until = 0.0

    @property
    def accepting(self) -> bool:
        """Running and not shutting down: new requests are admitted."""
        return self._accepting and self.healthy

    async def __aenter__(self) -> "AsyncEngine":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def healthy(self) -> bool:
        return self._task is not None and self.error is None and not self._task.done()

    @property
    def tokenizer(self) -> Any:
        return self._core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._core.max_model_len

    @property
    def template_has_tools(self) -> bool:
        return self._core.template_has_tools

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """Sampling parameters from the model's generation_config.json (requests that leave them out get these)."""
        return self._core.sampling_defaults

    @property
    def _core(self) -> EngineCore:
        if self.core is None:
            raise RuntimeError("the engine is not started: `await engine.start()` or `async with engine`")
        return self.core

    # ---- requests -------------------------------------------------------------------------------------------
    async def encode(self, prompt: PromptInput, add_special_tokens: bool = True,
                     chat: dict[str, Any] | None = None) -> list[int]:
        """Prompt (text, token ids, or chat messages) -> token ids, in the tokenizer thread pool. `chat`: keyword
        arguments of the chat template (EngineCore.encode)."""
        if EngineCore.is_token_ids(prompt):
            return list(prompt)  # token ids (make_request checks every one)
        if self._tokenizing >= MAX_PENDING_TOKENIZATIONS:
            raise EngineOverloadedError(f"{self._tokenizing} prompts are waiting to be tokenized: retry later")
        core = self._core
        core.check_prompt(prompt)  # refused before queueing (encode checks again, cheaply)
        loop = asyncio.get_running_loop()
        self._tokenizing += 1
        try:
            return await loop.run_in_executor(self._tokenize_pool, core.encode, prompt, add_special_tokens, chat)
        finally:
            self._tokenizing -= 1

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text, in the tokenizer thread pool. Raises InvalidRequestError for ids outside the
        vocabulary."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer", "tokens")
        vocab = self._core.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})", "tokens")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._core.decode, token_ids, skip_special_tokens)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the structured-output grammar of `params` in the tokenizer pool (open() then finds it cached
        instead of compiling on the loop). Raises InvalidRequestError for one that does not compile."""
        if params.structured_outputs is not None:
            await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._core.compile_grammar, params)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if this request can never be served (nothing is queued)."""
        self._core.make_request(prompt_token_ids, params)

    def open(self, prompt_token_ids: list[int], params: SamplingParams, notify: Notify) -> RequestStream:
        """Queue a tokenized request; push-style delivery for callers that consume many streams at once (the
        HTTP server). `notify(stream)` runs on the loop thread inside the engine loop whenever the stream has
        something to take (see RequestStream); it must return quickly and should not raise (an exception aborts
        the request). The caller must `abort(stream.request_id)` if it stops consuming before the stream is done.
        Raises InvalidRequestError / EngineShutdownError before anything is queued."""
        self._check_accepting()
        req = self._core.make_request(prompt_token_ids, params)
        stream = RequestStream(req, self._core.detokenizer(req), notify)
        self._core.add(req)
        self._streams[req.request_id] = stream
        self._wake.set()
        return stream

    async def stream(self, prompt: PromptInput, params: SamplingParams | None = None) -> AsyncIterator[StreamChunk]:
        """Chunks of new text and token ids; the last one has finish_reason and usage. Leaving the loop early
        (break, cancellation, aclose, garbage collection) aborts the request and frees its KV blocks."""
        params = params or SamplingParams()
        self._check_accepting()
        ids = await self.encode(prompt)
        await self.compile_grammar(params)
        ready = asyncio.Event()
        stream = self.open(ids, params, lambda _: ready.set())  # checks again: shutdown may have begun meanwhile
        try:
            while True:
                await ready.wait()
                ready.clear()
                stream.raise_error()
                chunk = stream.take()
                if chunk.text or chunk.token_ids or chunk.finish_reason:
                    yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if not stream.done:  # the consumer left early
                self.metrics.disconnects.inc()
                self.abort(stream.request_id)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise EngineShutdownError("the engine is shutting down: no new requests")
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running{f': {self.error}' if self.error else ''}")

    async def generate(self, prompt: PromptInput, params: SamplingParams | None = None) -> GenerateOutput:
        """The whole output at once (same text and tokens as concatenating `stream`'s chunks)."""
        prompt_ids = await self.encode(prompt)
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[Logprob] = []
        prompt_logprobs = None
        last: StreamChunk | None = None
        async for last in self.stream(prompt_ids, params):
            text.append(last.text)
            ids.extend(last.token_ids)
            logprobs.extend(last.logprobs or ())
            prompt_logprobs = last.prompt_logprobs or prompt_logprobs
        assert last is not None
        return GenerateOutput(last.request_id, prompt_ids, ids, "".join(text), last.finish_reason,  # type: ignore[arg-type]
                              logprobs=logprobs if params is not None and params.logprobs is not None else None,
                              prompt_logprobs=prompt_logprobs)

    def abort(self, request_id: str) -> None:
        """End a request; its KV blocks are freed before the next step."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.done:
            self._end(stream, "abort")
        self._deferred.setdefault(request_id, "abort")
        self._wake.set()

    # ---- the loop -------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        core = self._core
        loop = asyncio.get_running_loop()
        on_loop = self.launch_on_loop if self.launch_on_loop is not None else core.runner.stream is not None
        got: list[Request] = []  # (on_loop) requests that got a token in the step applied last, not delivered yet
        try:
            while not self._stopping:
                self._apply_deferred()
                if not core.busy:
                    if got:
                        self._deliver(got)
                        got = []
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if on_loop:
                    if (masks := core.masks_pending) is not None:
                        await asyncio.wrap_future(masks)  # the grammar thread's fill: launch would block on it
                    batch = core.schedule()
                    if got and batch.num_prompt_tokens:  # its launch takes the host milliseconds: tokens first
                        self._deliver(got)
                        got = []
                    handle = core.launch(batch)
                    if got:
                        self._deliver(got)  # the step applied last, while the GPU runs the ones queued
                        got = []
                    self._apply_deferred()  # stop strings free their blocks now (stream order keeps queued steps right)
                    if handle is None or handle.finished():  # the host is the slower side: no thread hand-off,
                        await asyncio.sleep(0)  # one pass of the loop for the connections, then the tokens
                        done = core.collect(handle)
                    else:
                        done = await loop.run_in_executor(self._step_pool, core.collect, handle)
                else:
                    done = await loop.run_in_executor(self._step_pool, core.advance, core.schedule())
                if done is None:
                    await asyncio.sleep(0.001)  # nothing fits this instant (all blocks busy): let aborts land
                    continue
                got = core.update(done)
                if not on_loop:
                    self._deliver(got)  # while the GPU runs the step just launched
                    got = []
                self._count()
            self._deliver(got)
        except Exception as e:
            log.exception("engine loop failed; failing all requests")
            self.error = e
            core.open_gates()  # a step queued behind a gate whose masks will never come would stall the GPU
            for stream in list(self._streams.values()):
                self._fail(stream, e)

    def _apply_deferred(self) -> None:
        if self._deferred:
            for request_id, reason in self._deferred.items():
                self._core.finish(request_id, reason)
            self._deferred.clear()

    def _deliver(self, reqs: list[Request]) -> None:
        """One pass over the requests that got a token: detokenize, stop strings, notify their consumers."""
        now = time.monotonic()
        streams, ttft = self._streams, self.metrics.ttft
        interval = self.config.stream_interval
        direct = interval == 1
        last_times: list[float] = []  # each token's previous token's time: the step's inter-token latencies
        finished = RequestStatus.FINISHED
        for req in reqs:
            stream = streams.get(req.request_id)
            if stream is None:  # finished (or aborted) already
                continue
            if req.max_tokens == 0:  # it finished without a token (an attribute read: this loop runs per token)
                self._end(stream, req.finish_reason or "length")
                continue
            n = stream.num_tokens
            token = req.token_ids[-1]
            if n == 0:
                ttft.observe(now - stream.t_arrival)
                self._first_token(req, now)
            else:
                last_times.append(stream.t_last)
            stream.num_tokens = n + 1
            stream.t_last = now
            detok = stream.detok
            if (sink := stream.sink) is not None and n and direct and sink[0].direct and detok is not None \
                    and not stream.new_ids and req.status is not finished \
                    and (text := detok.push_take(token)) is not None:  # (None: stop strings or held text)
                stream.num_taken = n + 1  # taken: the token's text goes straight to the consumer
                if text:
                    try:
                        sink[0].write_text(sink[1], text)
                    except Exception:
                        self._consumer_failed(stream)
                continue
            stream.new_ids.append(token)
            if detok is not None and detok.push(token):
                self._deferred[req.request_id] = "stop"  # the scheduler may still be stepping it
                self._end(stream, "stop")
            elif req.status is finished:
                self._end(stream, req.finish_reason or "stop")
            elif n == 0 or len(stream.new_ids) >= interval:  # the first token goes out at once
                self._notify(stream)
        if last_times:
            self.metrics.itl.observe_gaps(now, last_times)

    def _first_token(self, req: Request, now: float) -> None:
        """Split a request's time to first token: waiting for admission, then prefilled until delivered."""
        m = self.metrics
        m.queue_time.observe(req.scheduled_time - req.arrival_time)
        m.prefill_time.observe(now - req.scheduled_time)

    def _notify(self, stream: RequestStream) -> None:
        try:
            stream.notify(stream)
        except Exception:
            self._consumer_failed(stream)

    def _consumer_failed(self, stream: RequestStream) -> None:
        """A consumer's bug ends its own request, never the loop."""
        log.exception("the consumer of request %s failed; aborting it", stream.request_id)
        if not stream.done:
            self.abort(stream.request_id)

    def _end(self, stream: RequestStream, reason: str) -> None:
        """The stream's last notification: it finished for `reason`. It leaves the engine's streams."""
        stream.finish_reason = reason
        self._streams.pop(stream.request_id, None)
        self.metrics.finished(reason)
        self.metrics.e2e.observe(time.monotonic() - stream.t_arrival)
        self._notify(stream)

    def _fail(self, stream: RequestStream, error: BaseException) -> None:
        stream.error = error
        self._streams.pop(stream.request_id, None)
        self._notify(stream)

    def _count(self) -> None:
        """Move the scheduler's counters into the Prometheus counters (once per step)."""
        stats, last = self._core.stats, self._last_counts
        now = (stats.prompt_tokens, stats.generation_tokens, stats.num_preemptions, stats.cache_queries, stats.cache_hits)
        m = self.metrics
        for counter, new, old in zip((m.prompt_tokens, m.generation_tokens, m.preemptions, m.cache_queries,
                                      m.cache_hits), now, last):
            if new != old:
                counter.inc(new - old)
        self._last_counts = now

    # ---- stats ----------------------------------------------------------------------------------------------
    def _gauges(self) -> dict[str, float]:
        if self.core is None:
            return {}
        return {**self.core.gauges(), "event_loop_lag_seconds": self.loop_lag}

    @property
    def num_free_blocks(self) -> int:
        return self._core.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self._core.num_blocks
