"""A step's grammar work in native threads, without the GIL: accept the tokens a finished step sampled, fill the
masks of the step queued behind a stream gate, open the gate (grammar_work.c, calling xgrammar through tvm-ffi's C
ABI).

The Python path does the same in three parts: the accept on the step thread (the GIL held: 0.2-0.4 ms for 64
rows), the fill on the grammar thread, which needs the GIL to start, after xgrammar's call to return, and to open
the gate; while the step thread runs Python each wait lasts up to the switch interval. Here the step thread only
hands over the rows (tens of µs) and goes on; the workers take the rows one at a time (a row's accept, then its
fill), and the one that finishes the last row opens the gate.

A refused token (the mask allowed it, so never in practice) is known once the job is done, which the step thread
checks at its next collect: the request then ends with its next token, one later than on the Python path.
"""
from __future__ import annotations

import ctypes
import logging
import subprocess
import weakref
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asyncllm.native_build import load_native

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("grammar_work.c")


class GrammarWork:
    """The native workers (one job at a time). Used by one thread at a time (the one that collects steps)."""

    def __init__(self, threads: int) -> None:
        import tvm_ffi.libinfo
        import xgrammar.base

        lib = load_native(SOURCE)  # calls keep the GIL: each returns at once (gw_wait once the job is done)
        self._wait_lib = ctypes.CDLL(lib._name)  # calls let it go: gw_wait for a job still running, gw_free
        p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        for lib_, name, res, args in ((lib, "gw_new", p, [i32, p, p, p, p, p]),
                                      (lib, "gw_submit", i64, [p, i32, p, p, i32, p, p, p, i64, i64, p, ctypes.c_uint32]),
                                      (lib, "gw_done", i32, [p, i64]), (lib, "gw_wait", i32, [p, i64, p]),
                                      (self._wait_lib, "gw_wait", i32, [p, i64, p]),
                                      (self._wait_lib, "gw_free", None, [p])):
            fn = getattr(lib_, name)
            fn.restype, fn.argtypes = res, args
        self._lib = lib
        ffi = ctypes.CDLL(tvm_ffi.libinfo.find_libtvm_ffi())
        methods = {m.name: m.func for m in xgrammar.base._core.GrammarMatcher.__tvm_ffi_type_info__.methods}
        self._methods = methods["accept_token"], methods["fill_next_token_bitmask"]  # alive while the workers are
        address = [ctypes.cast(getattr(ffi, name), ctypes.c_void_p).value
                   for name in ("TVMFFIFunctionCall", "TVMFFIErrorMoveFromRaised", "TVMFFIObjectDecRef")]
        self._work = lib.gw_new(threads, *address, *(f.__chandle__() for f in self._methods))
        if not self._work:
            raise OSError("the grammar workers did not start")
        self._finalizer = weakref.finalize(self, self._wait_lib.gw_free, self._work)  # (close, or when dropped)
        self._seq = 0
        self._held: tuple[Sequence[tuple[Any, int]], Sequence[Any], torch.Tensor] | None = None  # the job's inputs
        self._flags = (ctypes.c_int8 * 0)()

    @staticmethod
    def make(threads: int) -> GrammarWork | None:
        """The workers, or None where they cannot run (no C compiler, not Linux, an xgrammar without tvm-ffi)."""
        try:
            return GrammarWork(threads)
        except (OSError, subprocess.SubprocessError, ImportError, AttributeError, KeyError) as e:
            log.warning("grammar work stays on the Python path (%s)", e)
            return None

    def submit(self, accept: Sequence[tuple[Any, int]], fill: Sequence[Any], bitmask: torch.Tensor,
               gate_word: int = 0, ticket: int = 0) -> None:
        """Start a job: advance each (request, token) of `accept` by its token, then fill row i of `bitmask` (host
        int32, [>= len(fill), W], contiguous) with the next tokens of `fill[i]`'s grammar (all allowed once it
        ended), then open the gate whose word is at `gate_word` (0: none) with `ticket`. A request's matcher is
        `grammar`, its tvm-ffi object's address `grammar_handle`. The previous job must be `finish`ed."""
        assert self._held is None, "the previous grammar job was not finished"
        assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
        accepting = array("Q", [r.grammar_handle for r, _ in accept])
        tokens = array("i", [t for _, t in accept])
        filling = array("Q", [r.grammar_handle for r in fill])
        allow_all = bytes([r.grammar_ended for r in fill])
        seq = self._lib.gw_submit(self._work, len(accepting), accepting.buffer_info()[0], tokens.buffer_info()[0],
                                  len(filling), filling.buffer_info()[0], allow_all, bitmask.data_ptr(),
                                  bitmask.shape[0], bitmask.shape[1], gate_word or None, ticket)
        if seq < 0:
            raise MemoryError("the grammar workers could not take the job")
        self._seq = seq
        # what the workers read stays alive until the job is finished (a request's matcher is never replaced)
        self._held = accept, fill, bitmask

    @staticmethod
    def handle(matcher: Any) -> int:
        """The address of an xgrammar matcher's tvm-ffi object (0 where xgrammar's binding is not tvm-ffi)."""
        handle = getattr(getattr(matcher, "_handle", None), "__chandle__", None)
        return handle() if handle is not None else 0

    @property
    def busy(self) -> bool:
        return self._held is not None

    def finish(self) -> None:
        """Wait for the job in flight (if any: at once when its gate opened) and note the tokens it refused."""
        if self._held is None:
            return
        accept = self._held[0]
        if len(self._flags) < len(accept):
            self._flags = (ctypes.c_int8 * max(64, 2 * len(accept)))()
        # done (the usual case: its gate opened before the step it gated finished): read it keeping the GIL, which
        # a call that lets it go could take up to the switch interval (5 ms) to get back beside the event loop
        lib = self._lib if self._lib.gw_done(self._work, self._seq) else self._wait_lib
        errors = lib.gw_wait(self._work, self._seq, self._flags)
        self._held = None
        if errors:
            raise RuntimeError(f"xgrammar raised in {errors} grammar calls of a step")
        flags = self._flags
        if not all(flags[:len(accept)]):
            for i, (req, token) in enumerate(accept):
                if not flags[i]:
                    log.warning("request %s: its grammar refused token %d", req.request_id, token)
                    req.grammar_refused = True

    def close(self) -> None:
        """Stop the workers (after the job in flight)."""
        self._finalizer()
