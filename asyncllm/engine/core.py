"""EngineCore: the synchronous heart shared by `LLM` and `AsyncEngine` — admission, one step at a time."""
from __future__ import annotations

import array
import functools
import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from asyncllm.config import EngineConfig
from asyncllm.engine.detokenizer import IncrementalDetokenizer, token_decoder
from asyncllm.engine.grammar import Grammars, HandoffThread, HostMasks, MaskFill, accept_tokens, fill_threads, grammar_tokens
from asyncllm.engine.kv_cache import BlockManager
from asyncllm.engine.native_grammar import GrammarWork
from asyncllm.engine.request import Request
from asyncllm.engine.runner import Deferred, ModelRunner
from asyncllm.engine.step_inputs import StepHandle
from asyncllm.engine.stream_gate import StreamGate
from asyncllm.engine.scheduler import Batch, Scheduler, SchedulerConfig, SchedulerStats, StepLogprobs
from asyncllm.errors import InvalidRequestError, ModelLoadError
from asyncllm.model_files import resolve_model
from asyncllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def resolve_max_model_len(requested: int | None, hf_config: Any) -> int:
    model_len = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(hf_config, "sliding_window", None)
    if window and window < model_len:
        # sliding-window attention is not implemented: stay within the window, where it equals full attention
        log.warning("model uses a sliding window of %d tokens: max_model_len capped to it", window)
        model_len = window
    if requested is None:
        return model_len
    if requested > model_len:
        raise InvalidRequestError(
            f"max_model_len={requested} exceeds the model's context length ({model_len})", "max_model_len"
        )
    return requested


def read_config(model_dir: Path) -> Any:
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {first} (fix or replace the file)") from e


def load_tokenizer(path: os.PathLike[str] | str) -> Any:
    """The HF tokenizer, or None for a directory without one (then only token-id prompts work)."""
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in files):
        log.warning("no tokenizer files in %s: prompts must be token ids", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        log.warning("no tokenizer loaded from %s (%s): prompts must be token ids", path, e)
        return None


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_dir: os.PathLike[str]) -> dict[str, float]:
    """The sampling parameters the model's generation_config.json sets (only those it sets, not transformers'
    own defaults): the server applies them to requests that leave them out."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        import json

        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    return {k: data[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(data.get(k), (int, float))}


def eos_token_ids(model_dir: os.PathLike[str], tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.hf_config = read_config(self.model_dir)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_dir)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.hf_config)
        self.runner = ModelRunner(config, self.model_dir, self.hf_config, self.max_model_len)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        max_tokens = self.runner.max_step_tokens
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, max_tokens, self.max_model_len,
                                                   config.max_prefill_delay_steps, config.max_step_slowdown),
                                   self.blocks)
        # start-up timings, until steps are measured
        if self.runner.graphs is not None and self.runner.graphs.decode_ms:
            self.scheduler.costs.decode_ms = self.runner.graphs.decode_ms
        if self.runner.pieces is not None and self.runner.pieces.ms_per_token:
            self.scheduler.costs.ms_per_prompt_token = self.runner.pieces.ms_per_token
        self.eos_token_ids = eos_token_ids(self.model_dir, self.tokenizer)
        if self.tokenizer is not None and self.runner.tp.is_leader:  # not at the first request, on the loop thread
            token_decoder(self.tokenizer).warm_up()
        self.sampling_defaults = sampling_defaults(self.model_dir) if config.generation_config == "auto" else {}
        if self.sampling_defaults:
            log.info("sampling defaults from generation_config.json: %s", self.sampling_defaults)
        # overlap scheduling: step N+1 is scheduled and launched before step N's tokens are read back
        self.overlap = config.overlap_schedule if config.overlap_schedule is not None else self.runner.stream is not None
        self._inflight: StepHandle | None = None
        self._deferred: tuple[Deferred, Future[HostMasks]] | None = None  # forward queued, masks being filled (overlap)
        self._to_mask: Deferred | None = None  # launched deferred: its masks start once the step before is collected
        # CUDA: a deferred step's sampling is queued at once behind a closed StreamGate, which the grammar thread opens
        # once it filled the masks (the host goes on meanwhile); else (or with this off) the host waits for the masks
        self.gate_masks = self.runner.stream is not None
        self._to_fill: tuple[MaskFill, int] | None = None  # queued behind a closed gate: its fill starts at collect
        self._filling: Future[HostMasks] | None = None  # the fill that opens the gate of the step in flight
        # under a gate: the accept, fill and gate opening in native threads (GrammarWork) instead of the step and
        # grammar threads, where they can be built
        self.native_grammar = True
        self._stopped = False
        self._ids = itertools.count()
        self._id_prefix = os.urandom(4).hex()

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Validate and build a request (not queued yet). Raises InvalidRequestError."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling parameters are a SamplingParams, not {type(params).__name__}", "params")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.max_model_len - len(prompt_token_ids))
        self.scheduler.check(len(prompt_token_ids), max_tokens)  # the length first: it bounds the loop below
        vocab = self.hf_config.vocab_size
        try:  # int64 through array (a C loop: prompts are long), then the range with numpy
            ids = np.frombuffer(array.array("q", prompt_token_ids), dtype=np.int64)
        except (TypeError, OverflowError):
            ids = None
        if ids is None or ids.min() < 0 or ids.max() >= vocab:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        params.validate()  # again: the caller may have changed them since they were made
        for name in ("logit_bias", "stop_token_ids"):  # (validate checked they are non-negative integers)
            given = getattr(params, name)
            if given and max(given) >= vocab:
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", name)
        rid = f"{self._id_prefix}-{next(self._ids)}"
        req = Request(rid, list(prompt_token_ids), params, max_tokens, self.eos_token_ids)
        if params.structured_outputs is not None:
            req.grammar = self.grammars.matcher(params.structured_outputs)
            req.grammar_stops = frozenset(req.grammar.stop_token_ids)
            req.grammar_handle = GrammarWork.handle(req.grammar)
        return req

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured outputs' compiler (made at the first request that needs it: ~0.5 s for a 150k vocabulary)."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured outputs need a tokenizer", "structured_outputs")
        return Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)

    def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar ahead (any thread): make_request then finds it cached. Raises
        InvalidRequestError."""
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """No text longer than this can fit in max_model_len tokens: a token never covers more characters than
        the longest vocabulary entry has. Checked before tokenizing, so a huge prompt costs nothing."""
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) if self.tokenizer is not None else 1
        return self.max_model_len * max(longest, 1)

    @staticmethod
    def is_token_ids(prompt: Any) -> bool:
        """A prompt of token ids (a list or tuple of integers; make_request checks each one), not text or messages."""
        return isinstance(prompt, (list, tuple)) and (not prompt or isinstance(prompt[0], int))

    def check_prompt(self, prompt: str | Sequence[dict[str, Any]]) -> None:
        """Raise InvalidRequestError for what is neither text nor chat messages (dicts), without a tokenizer, or
        for text (or messages' contents) too long to fit."""
        if isinstance(prompt, str):
            num_chars = len(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            num_chars = sum(len(c) for m in prompt if isinstance(c := m.get("content"), str))
        else:
            raise InvalidRequestError(f"a prompt is text, a list of token ids or a list of chat messages (dicts), "
                                      f"not {type(prompt).__name__} {str(prompt)[:40]!r}", "prompt")
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send token ids", "prompt")
        if num_chars > self.max_prompt_chars:
            raise InvalidRequestError(
                f"the prompt has {num_chars} characters: too long for this model's maximum context length of "
                f"{self.max_model_len} tokens", "prompt")

    # ---- input processing (shared by LLM and AsyncEngine; AsyncEngine runs it in its tokenizer pool) ---------
    def encode(self, prompt: str | Sequence[dict[str, Any]], add_special_tokens: bool = True,
               chat: dict[str, Any] | None = None) -> list[int]:
        """Text, or chat messages (the model's chat template is applied, with the keyword arguments `chat`:
        tools, add_generation_prompt, continue_final_message, template variables), -> token ids. Raises
        InvalidRequestError without a tokenizer, for text too long to fit, or for messages the template rejects."""
        self.check_prompt(prompt)
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        options = {"add_generation_prompt": True, **(chat or {})}
        try:
            out = self.tokenizer.apply_chat_template(list(prompt), tokenize=True, return_dict=True, **options)
        except Exception as e:  # template errors are the caller's: bad roles, bad content
            raise InvalidRequestError(f"cannot apply the chat template: {e}", "messages") from e
        return list(out["input_ids"])

    @property
    def template_has_tools(self) -> bool:
        """The chat template renders `tools` itself (else the server puts them in a system message)."""
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        return isinstance(template, str) and "tools" in template

    # ---- output processing -----------------------------------------------------------------------------------
    def detokenizer(self, req: Request, always: bool = True) -> IncrementalDetokenizer | None:
        """The request's incremental detokenizer (stop strings are matched in its text): None without a
        tokenizer, or when not `always` and the request has no stop strings (its text is decoded once at the
        end). Raises InvalidRequestError for stop strings without a tokenizer."""
        if self.tokenizer is None:
            if req.params.stop:
                raise InvalidRequestError("stop strings need a tokenizer", "stop")
            return None
        if not always and not req.params.stop:
            return None
        return IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    # ---- the scheduler, through this door only ---------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a request built by make_request."""
        self.scheduler.add(req)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        req = self.make_request(prompt_token_ids, params)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def finish(self, request_id: str, reason: str) -> None:
        """End a request the scheduler may still be stepping (a stop string matched, or "abort"); its KV blocks
        are freed now. Nothing happens for a request already finished."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish(req, reason)

    def schedule(self) -> Batch:
        return self.scheduler.schedule()

    def update(self, done: tuple[Batch, list[int], StepLogprobs | None] | None) -> list[Request]:
        """Apply a finished step (from `advance`): append its tokens (and log-probabilities); returns the requests
        that got one (or finished without one: max_tokens=0)."""
        return self.scheduler.update(*done) if done is not None else []

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    def gauges(self) -> dict[str, float]:
        s, b = self.scheduler, self.blocks
        return {"num_requests_running": len(s.running), "num_requests_waiting": len(s.waiting),
                "kv_cache_usage_perc": b.usage, "kv_cache_free_blocks": b.num_free_blocks,
                "prefix_cache_blocks": b.num_cached_blocks, "decode_step_seconds": s.costs.decode_ms / 1e3,
                "prompt_token_limit": s.costs.limit() or 0}

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def is_follower(self) -> bool:
        """Tensor parallelism, ranks 1..N-1: this process only runs the steps rank 0 sends (`follow`)."""
        return not self.runner.tp.is_leader

    def follow(self) -> None:
        """Follower ranks: serve rank 0's steps; returns when rank 0 shuts down."""
        self.runner.follow()

    def shutdown(self) -> None:
        """Stop: release the followers (tensor parallelism, rank 0), then free every device buffer (KV cache,
        CUDA graphs, weights). Idempotent; nothing can run afterwards."""
        if not self._stopped:
            self._stopped = True
            self.open_gates()
            self._inflight = self._deferred = self._to_mask = self._filling = None
            if "_grammar_thread" in self.__dict__:
                self._grammar_thread.shutdown()
            if (work := self.__dict__.get("_grammar_work")) is not None:
                work.close()  # waits for a job in flight
            self.runner.stop_followers()
            self.runner.close()

    def open_gates(self) -> None:
        """Let the stream past every StreamGate queued so far (steps abandoned before their masks were filled: a
        closed gate would stall the stream for good)."""
        self._to_fill = None
        if self.__dict__.get("_gate") is not None:
            self._gate.open_all()

    @property
    def busy(self) -> bool:
        """Requests to serve, or a step still in flight."""
        return (self.scheduler.has_unfinished or self._inflight is not None or self._deferred is not None
                or self._to_mask is not None)

    def advance(self, batch: Batch) -> tuple[Batch, list[int], StepLogprobs | None] | None:
        """Launch `batch` (if not empty), then wait for a step to finish and return it with its sampled tokens:
        with overlap, the step launched before (the new one keeps the GPU busy meanwhile); without, this one.
        Blocks its thread on the GPU. None if nothing ran. `launch` then `collect`, in one call.

        Structured outputs under overlap: a constrained row fed from the step in flight needs that step's token in
        its matcher before its mask. Such a step's forward is queued at once; once the finished step's tokens
        advanced the matchers, a grammar thread fills the new masks while the caller applies the finished step and
        schedules the next. With CUDA the step's sampling is queued at once too, behind a StreamGate the grammar
        thread opens after its fill, so the next step's forward is queued before the masks exist; without a gate
        the next launch waits for the masks and queues the step's sampling first (ModelRunner.complete)."""
        return self.collect(self.launch(batch))

    @property
    def masks_pending(self) -> Future[HostMasks] | None:
        """The grammar masks the next `launch` needs first (it blocks on them): a caller that must not block awaits
        this future before."""
        return self._deferred[1] if self._deferred is not None else None

    def launch(self, batch: Batch) -> StepHandle | None:
        """Queue `batch` (if not empty) and return at once with the step to `collect` next: with overlap, the one
        launched before; without, this one (CPU: the step is computed here). Blocks only on `masks_pending`."""
        if self._deferred is not None:
            step, masks = self._deferred
            self._deferred = None
            self._inflight = self.runner.complete(step, masks.result())
        defer = self.overlap and batch.constrained and any(
            r.grammar is not None and f >= 0 for r, f in zip(batch.requests, batch.feed))
        launched: StepHandle | Deferred | None = None
        if batch and defer:
            launched = self.runner.launch(batch, defer=True)
            gate = self._gate if self.gate_masks else None
            if gate is not None:  # its sampling waits on the GPU for the masks `collect` starts
                assert self._to_fill is None, "a gated step's masks were never filled"
                job = self.runner.mask_job(launched)  # type: ignore[arg-type]
                self._to_fill = job, gate.close()
                launched = self.runner.complete(launched, job.masks)  # type: ignore[arg-type]
                defer = False
        elif batch:
            launched = self.runner.launch(batch)
        self._to_mask = launched if defer else None  # type: ignore[assignment]
        if not self.overlap:
            return launched  # type: ignore[return-value]
        handle, self._inflight = self._inflight, None if defer else launched  # type: ignore[assignment]
        return handle

    def collect(self, handle: StepHandle | None) -> tuple[Batch, list[int], StepLogprobs | None] | None:
        """Wait for `launch`'s step (blocks the calling thread on the GPU, not the event loop: call it from a worker
        thread) and return it with its sampled tokens, its constrained rows' matchers advanced; then start the
        grammar masks of the step launched deferred or behind a gate (always: a gate left closed stalls the GPU)."""
        done = None
        try:
            if handle is not None:
                tokens, logprobs = handle.wait()
                done = handle.batch, tokens, logprobs
                if self._filling is not None:  # it opened this step's gate (or an earlier one's): done, or returning
                    filling, self._filling = self._filling, None
                    filling.result()  # its error, if it failed
            if (started := self.__dict__.get("_grammar_work")) is not None:
                started.finish()  # the job that opened this step's gate: done (or all but done)
            if done is not None and done[0].constrained:
                if self._to_fill is not None and self._work is not None:
                    accept = grammar_tokens(done[0], done[1])
                    for req, token in accept:
                        req.grammar_ended = token in req.grammar_stops
                    self._start_fill(accept)
                else:
                    accept_tokens(done[0], done[1])  # needs the GIL throughout: a thread would not run it alongside
        finally:
            if self._to_mask is not None:
                step, self._to_mask = self._to_mask, None
                self._deferred = step, self._grammar_thread.submit(self.runner.mask_job(step).run)
            if self._to_fill is not None:
                self._start_fill([])
        return done

    def _start_fill(self, accept: list[tuple[Request, int]]) -> None:
        """Start the masks of the step queued behind the gate (after the tokens of `accept`, native workers only),
        which open the gate once filled."""
        assert self._to_fill is not None
        (job, ticket), self._to_fill = self._to_fill, None
        work = self._work
        if work is not None:
            if work.busy:  # (collect failed before it finished the last job)
                work.finish()
            work.submit(accept, job.requests, job.masks.bitmask, self._gate.word_address, ticket)  # type: ignore[union-attr]
        else:
            self._filling = self._grammar_thread.submit(self._fill_and_open, job, ticket)

    @property
    def _work(self) -> GrammarWork | None:
        """The native grammar workers, when steps go behind a gate (and they can run here)."""
        if self.native_grammar and self.gate_masks and self.__dict__.get("_gate") is not None:
            return self._grammar_work
        return None

    @functools.cached_property
    def _grammar_work(self) -> GrammarWork | None:
        return GrammarWork.make(fill_threads())

    def _fill_and_open(self, job: MaskFill, ticket: int) -> HostMasks:
        try:
            return job.run()
        finally:
            self._gate.open(ticket)  # type: ignore[union-attr]

    @functools.cached_property
    def _gate(self) -> StreamGate | None:
        gate = StreamGate.make(self.runner.stream)
        self.gate_masks = gate is not None
        return gate

    @functools.cached_property
    def _grammar_thread(self) -> HandoffThread:
        return HandoffThread("asyncllm-grammar")

    def step(self) -> list[Request]:
        """Schedule, launch and apply one step (with overlap, apply the previous one); returns the requests that
        got a token."""
        return self.update(self.advance(self.schedule()))
