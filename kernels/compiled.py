"""How many Triton kernel variants this process has compiled: the engine compiles every variant it can hit
at start-up (warm-up, graph capture), so the count must not grow while serving (a compile mid-run stalls a step
for a second or more)."""
from __future__ import annotations

import importlib
from typing import Any

MODULES = ("activation", "allreduce_norm", "kv_store", "paged_attention", "rmsnorm", "rope", "sampling")


def _variants(fn: Any) -> int:
    fn = getattr(fn, "fn", fn)  # an autotuner wraps the JIT function
    caches = getattr(fn, "device_caches", None)  # triton >= 3.2: device -> (kernel cache, ...)
    return sum(len(c[0]) for c in caches.values()) if isinstance(caches, dict) else 0


def compiled_variants() -> dict[str, int]:
    """kernel name -> variants compiled so far (all devices), for the kernels that have any."""
    out: dict[str, int] = {}
    for name in MODULES:
        module = importlib.import_module(f"asyncllm_kernels.{name}")
        for attr, obj in vars(module).items():
            n = _variants(obj)
            if n:
                out[f"{name}.{attr}"] = n
    return out
