"""Counting Triton compilations: the engine compiles every kernel variant it can hit at start-up (warm-up, graph
capture), so none may compile while it serves (a compile stalls a step for a second or more)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def count_compilations() -> Iterator[list[int]]:
    """Yields [n]: the Triton kernels compiled in this process while the block runs (triton >= 3.4 knobs)."""
    from triton import knobs

    count = [0]
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        yield count
    finally:
        knobs.runtime.jit_post_compile_hook = previous
