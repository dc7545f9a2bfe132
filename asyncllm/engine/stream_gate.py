"""A gate in a CUDA stream that the host opens: work queued behind `close()` runs once the host calls `open` with
the ticket `close` returned (the driver's stream memory operations: the stream waits until a page-locked word
reaches the ticket, `cuStreamWaitValue32`).

Used for structured outputs under overlap: a step's sampling needs grammar masks that a host thread fills only
after the step before it ended. With a gate the host queues that sampling, and the next step's forward behind
it, before the masks exist, and goes on; the grammar thread fills the masks in place and opens the gate. A copy
from page-locked memory reads the host memory when it runs, so a mask copy queued behind the gate carries what
the fill wrote (x86 keeps the fill's stores before the ticket's).

Invariants: tickets are opened in the order they were closed (one grammar thread), and every ticket is opened
eventually (a closed gate stalls the stream for good: `open_all` on every path that abandons queued steps).
"""
from __future__ import annotations

import ctypes
import logging
import threading

import torch

log = logging.getLogger(__name__)

WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ: until (int32_t)(*addr - value) >= 0 (cyclic)


class StreamGate:
    """One gate on one CUDA stream. `close` and `open` may be called from different threads."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self._wait = lib.cuStreamWaitValue32_v2
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self._wait.restype = ctypes.c_int
        self.stream = stream
        self._word = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # the ticket opened last
        self._host = self._word.numpy().view("uint32")
        pointer = ctypes.c_uint64()
        get = lib.cuMemHostGetDevicePointer_v2
        get.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        # page-locked memory is mapped into the device's address space; its device address (the host one under UVA)
        self._address = pointer.value if get(ctypes.byref(pointer), self._word.data_ptr(), 0) == 0 else self._word.data_ptr()
        self._closed = 0  # the ticket closed last
        self._lock = threading.Lock()
        self.close()  # a first wait, satisfied at once: raises here if this driver lacks stream memory operations
        self.open_all()

    @staticmethod
    def make(stream: torch.cuda.Stream | None) -> StreamGate | None:
        """A gate on `stream`, or None (no CUDA stream, or the driver cannot wait on host memory)."""
        if stream is None:
            return None
        try:
            return StreamGate(stream)
        except (OSError, AttributeError, RuntimeError) as e:
            log.warning("no stream gate (%s): grammar masks are waited for on the host", e)
            return None

    def close(self) -> int:
        """Queue a wait on the stream: what is queued after it runs once `open(ticket)`. Returns the ticket."""
        with self._lock:
            ticket = self._closed = (self._closed + 1) & 0xFFFFFFFF
        rc = self._wait(ctypes.c_void_p(self.stream.cuda_stream), self._address, ticket, WAIT_GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUresult {rc}")
        return ticket

    @property
    def word_address(self) -> int:
        """The host address of the page-locked word the stream waits on (for a native thread that opens the gate:
        it must store only tickets closed here, in order, each as a cyclic max: never an older one over a newer)."""
        return self._word.data_ptr()

    def open(self, ticket: int) -> None:
        """Let the stream run past the wait of `ticket` (and of every earlier one). A ticket older than the one
        opened last changes nothing."""
        with self._lock:
            if ((ticket - int(self._host[0])) & 0xFFFFFFFF) < 0x80000000:
                self._host[0] = ticket

    def open_all(self) -> None:
        """Open every wait queued so far."""
        self.open(self._closed)
