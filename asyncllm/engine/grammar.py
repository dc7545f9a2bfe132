"""Structured outputs: a request's tokens constrained by a grammar (xgrammar).

A request with `SamplingParams.structured_outputs` holds a matcher (`Request.grammar`). Before a step, rank 0 fills
one bitmask row per constrained row that samples (the tokens its grammar allows next; 10-50 us a row for a JSON
schema with a 49k vocabulary, most inside strings) and the step sets every other logit of that row to -inf before
sampling (`TokenMask`); once the step's tokens are on the host the step's thread advances the matchers
(`accept_tokens`), and a grammar that is complete ends the request ("stop"). A mask needs the request's previous
token: under overlap scheduling, a step with a constrained row whose previous token is still on the device queues
its forward at once and its sampling behind a `StreamGate` (CUDA; without one, only after the previous step's
tokens advanced the matchers: `ModelRunner.complete`), so the GPU runs the forward while the host fills the masks
(in parallel threads: `MaskFill`, on the grammar thread: `HandoffThread`, which opens the gate).

Grammars are compiled once per distinct spec (xgrammar caches them too) in the tokenizer pool before the request
is queued (`AsyncEngine` precompiles), so the event loop never waits on a compilation.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling_params import StructuredOutputs

log = logging.getLogger(__name__)
MAX_CACHED = 256  # compiled grammars kept (LRU)


class Grammars:
    """One tokenizer's grammar compiler and cache; thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.vocab_size = vocab_size
        self.stop_tokens = sorted(eos_token_ids) or None
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_tokens)
        self.compiler = xgrammar.GrammarCompiler(info)
        self._cache: OrderedDict[StructuredOutputs, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled grammar of `spec` (cached). Raises InvalidRequestError for a schema, regex or grammar
        xgrammar cannot compile."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            if len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputs) -> Any:
        c = self.compiler
        try:
            # JSON without free whitespace between tokens (a small model may otherwise emit whitespace forever)
            if spec.json is not None:
                return c.compile_json_schema(spec.json, any_whitespace=False)
            if spec.json_object:  # OpenAI's json_object: an object, not any JSON value
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.regex is not None:
                return c.compile_regex(spec.regex)
            if spec.choice is not None:
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_string(s) for s in spec.choice))
            assert spec.grammar is not None
            return c.compile_grammar(spec.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors with the reason
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidRequestError(f"cannot compile the structured output: {first}", "structured_outputs") from e

    def matcher(self, spec: StructuredOutputs) -> Any:
        return self.xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=self.stop_tokens)


# tvm-ffi functions (xgrammar's binding layer) that keep the GIL: see `_hold_gil_in_short_calls`
SHORT_FFI_CALLS = (("xgrammar.base", "_core.BatchGrammarMatcher.batch_accept_token"),
                   ("tvm_ffi.container", "_ffi_api.ArraySize"), ("tvm_ffi.container", "_ffi_api.ArrayGetItem"),
                   ("tvm_ffi.container", "_ffi_api.ArrayContains"))


def short_ffi_calls() -> list[Any]:
    """The functions of SHORT_FFI_CALLS that are tvm-ffi functions here (none where xgrammar's binding is not)."""
    import importlib

    found = []
    for module, path in SHORT_FFI_CALLS:
        try:
            fn: Any = importlib.import_module(module)
            for part in path.split("."):
                fn = getattr(fn, part)
        except (ImportError, AttributeError):
            continue
        if isinstance(getattr(fn, "release_gil", None), bool):
            found.append(fn)
    return found


@functools.cache
def _hold_gil_in_short_calls() -> None:
    """tvm-ffi lets the GIL go around every call, and taking it back waits up to the interpreter's switch interval
    (5 ms) whenever another thread runs Python: xgrammar's batch accept of 64 rows plus the reads of its result
    array (two calls per row) took 43-60 ms beside a thread running Python (0.7 / 0.18 ms keeping the GIL, on the
    CPU machine / the H200's host). These short calls keep the GIL; the long mask fill still lets it go."""
    for fn in short_ffi_calls():
        fn.release_gil = False


@functools.cache
def _batch_matcher() -> Any:
    import xgrammar

    _hold_gil_in_short_calls()

    return xgrammar.BatchGrammarMatcher(fill_threads())


def fill_threads() -> int:
    """Threads for a step's mask fill: half the cores this process may use, at most 8 (xgrammar's "auto" is half of
    std::thread::hardware_concurrency(), which in a container counts the host's cores instead)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, usable // 2))


class MaskFill:
    """One step's grammar masks in two parts. Made on the caller's thread: `masks`, the [len(requests),
    ceil(vocab / 32)] int32 host bitmask (rows of `out` when given: a reused page-locked buffer; torch calls, which
    let the GIL go) with `rows`, the requests' rows among the step's sampled logits. Then `run` (once the grammars
    hold every earlier token) fills the bitmask in place with the allowed next tokens of each request's grammar in
    one call that holds no GIL (xgrammar's batch fill, parallel threads): the grammar thread's part, which takes the
    GIL back only to return. The row of a grammar that ended (its request ends; the row is dropped) allows every
    token."""

    def __init__(self, requests: list[Any], vocab_size: int, rows: torch.Tensor, out: torch.Tensor | None = None) -> None:
        width = -(-vocab_size // 32)
        self.requests = requests
        bitmask = torch.empty((len(requests), width), dtype=torch.int32) if out is None else out[:len(requests), :width]
        self.masks = HostMasks(rows, bitmask)
        self._rows = bitmask.numpy()  # numpy keeps the GIL (the worker's Python before the fill stays short)

    def run(self) -> HostMasks:
        live = []
        for i, r in enumerate(self.requests):
            if r.grammar_ended:  # by the token accepted since this step was queued
                self._rows[i] = -1
            else:
                live.append(i)
        if live:
            _batch_matcher().batch_fill_next_token_bitmask([self.requests[i].grammar for i in live],
                                                          self.masks.bitmask, live)
        return self.masks


def grammar_tokens(batch: Any, tokens: list[int]) -> list[tuple[Any, int]]:
    """(request, token) of a finished step's rows whose grammar takes the token they sampled."""
    reqs = batch.requests
    if len(tokens) == len(reqs):  # every row sampled: row i's token is tokens[i] (constrained rows have extras)
        pairs = [(reqs[i], tokens[i]) for i in batch.extras]
    else:
        pairs = list(zip((r for r, s in zip(reqs, batch.sample) if s), tokens))
    return [(r, t) for r, t in pairs if r.grammar is not None and not r.grammar_ended]


def accept_tokens(batch: Any, tokens: list[int]) -> None:
    """Advance the grammars of a finished step's constrained rows by the tokens they sampled (in one call), before
    the next masks are filled. A grammar ends with its stop token; a refused token (never: the mask allowed it)
    ends the request. (Under a stream gate with native workers: `GrammarWork`, off the GIL.)"""
    pairs = grammar_tokens(batch, tokens)
    if not pairs:
        return
    accepted = _batch_accept()([r.grammar for r, _ in pairs], [t for _, t in pairs])
    # one call asks whether any was refused: reading each row's flag costs as much as the accept (two calls a row)
    flags = list(accepted) if 0 in accepted else None
    for i, (req, token) in enumerate(pairs):
        if flags is not None and not flags[i]:
            log.warning("request %s: its grammar refused token %d", req.request_id, token)
            req.grammar_refused = True
        elif token in req.grammar_stops:
            req.grammar_ended = True


@functools.cache
def _batch_accept() -> Callable[[list[Any], list[int]], Any]:
    """xgrammar's batch accept, returning a sequence of flags (0: refused): where its binding is tvm-ffi's, the
    binding's function on the matchers' handles, whose result stays a tvm-ffi array (not read row by row)."""
    import xgrammar.base

    wrapper = _batch_matcher().batch_accept_token
    raw = getattr(getattr(getattr(xgrammar.base, "_core", None), "BatchGrammarMatcher", None), "batch_accept_token", None)
    if raw is None:
        return wrapper
    return lambda matchers, tokens: raw([m._handle for m in matchers], tokens, False)


T = TypeVar("T")


class HandoffThread:
    """One worker thread for work that mostly runs without the GIL (xgrammar's batch mask fill), beside a caller
    that goes straight on with Python work (applying a step, scheduling). A thread woken while another thread runs
    Python waits up to `sys.getswitchinterval()` (5 ms by default) for the GIL, both to start its job and, after
    the job's GIL-free call, to return (which opens a stream gate, or hands the masks over). So while a job runs the
    switch interval is `switch_interval` (0.1 ms; the interpreter's own is restored when none runs): the worker gets
    the GIL that soon while the caller runs on. With `switch_interval` None (the interpreter's interval throughout)
    `submit` instead returns only once the worker has started the call, or the job would start only once the caller
    blocks, and the two would run one after the other instead of side by side."""

    switch_interval = 1e-4  # seconds; None: leave the interpreter's

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._active = 0
        self._saved = 0.0

    def submit(self, fn: Callable[..., T], *args: Any) -> "Future[T]":
        started = threading.Event()

        def run() -> T:
            started.set()  # (switch_interval None) the caller wakes, and gets the GIL when `fn` lets it go
            try:
                return fn(*args)
            finally:
                self._switching(-1)

        self._switching(1)
        future = self._pool.submit(run)
        if self.switch_interval is None:
            started.wait()
        return future

    def _switching(self, change: int) -> None:
        if self.switch_interval is None:
            return
        with self._lock:
            if change > 0 and not self._active:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(self.switch_interval)
            self._active += change
            if not self._active:
                sys.setswitchinterval(self._saved)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def _ebnf_string(s: str) -> str:
    """`s` as an EBNF string literal."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


@dataclass
class HostMasks:
    """A step's grammar masks on the host (page-locked for CUDA), from the thread that filled them."""

    rows: torch.Tensor  # [R] int64 rows of the step's sampled logits
    bitmask: torch.Tensor  # [R, W] int32

    def to(self, device: torch.device) -> TokenMask:
        return TokenMask(self.rows.to(device, non_blocking=True), self.bitmask.to(device, non_blocking=True))


@dataclass
class TokenMask:
    """Rank 0: the allowed tokens of some sampled rows; every other logit of those rows becomes -inf."""

    rows: torch.Tensor  # [R] int64 rows of the step's sampled logits
    bitmask: torch.Tensor  # [R, W] int32: bit j of word w allows token 32 w + j

    @staticmethod
    def warm_up(logits: torch.Tensor) -> None:
        """Compile the CUDA kernel for these logits' dtype and width at start-up (not at the first grammar)."""
        rows = torch.zeros(1, dtype=torch.int64, device=logits.device)
        TokenMask(rows, torch.full((1, -(-logits.shape[1] // 32)), -1, dtype=torch.int32, device=logits.device)).apply(logits[:1])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """In place (CUDA: one kernel)."""
        if logits.is_cuda:
            from asyncllm_kernels import apply_token_bitmask_

            apply_token_bitmask_(logits, self.rows, self.bitmask)
        else:
            apply_bitmask_ref(logits, self.rows, self.bitmask)
        return logits


def apply_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[i], v] = -inf wherever bit v of bitmask[i] is 0, in place, in torch (asyncllm_kernels'
    apply_token_bitmask_ on CUDA)."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1)[:, : logits.shape[1]]
    picked = logits.index_select(0, rows).masked_fill_(allowed == 0, float("-inf"))
    logits.index_copy_(0, rows, picked)
