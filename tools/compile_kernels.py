"""Compile the engine's Triton kernels for a CUDA GPU on a machine without one: each kernel wrapper is called with
CPU tensors at the decode and prefill shapes of SmolLM2-135M, Qwen3-0.6B and Llama-3.1-8B (bf16, and at one shape
fp16 and fp32 too; with and without programmatic dependent launch; the wrappers' own branches; tensor parallelism's
all-reduce norm), and every variant it launches is compiled to a cubin for the target (Triton's own compiler and
ptxas) instead of launched. Catches what Triton's interpreter does not: type errors of the compiler's front end
(e.g. a helper returning int32 on one branch and int64 on the other), unsupported ops, more shared memory than a
block may have. One JSON line per compiled variant with its shared memory, registers, spills, programs that fit an
SM at once, and compile time, then a summary line; exit status 1 if any call failed.
    python tools/compile_kernels.py [--arch 90]
(Triton's interpreter must be off: TRITON_INTERPRET unset or 0.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import run_fields  # noqa: E402

MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes a block may have, by arch

# name: (hidden, q heads, kv heads, head_dim, intermediate, vocab, q/k norm)
SHAPES = {
    "smollm2-135m": (576, 9, 3, 64, 1536, 49152, False),
    "qwen3-0.6b": (1024, 16, 8, 128, 3072, 151936, True),
    "llama-3.1-8b": (4096, 32, 8, 128, 14336, 128256, False),
}
DTYPES_SHAPE = "qwen3-0.6b"  # the shape also compiled in fp16 and fp32
SMS = 132  # the grids' SM count (H100 / H200), in place of the interpreter's stand-in


class CompileOnlyDriver:
    """Triton's active driver where there is no GPU: the target, device 0, stream 0."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


UNSUPPORTED = 3  # exit status where this Triton's JIT internals are not the ones `install` replaces
# an sm_90 SM: registers, shared memory (bytes; 1 KB of it reserved per program), warps
SM_REGS, SM_SHARED, SM_WARPS, SHARED_RESERVED = 65536, 228 * 1024, 64, 1024


def resources(kernel: Any, num_warps: int) -> dict:
    """Registers per thread and spilled bytes of a compiled kernel (cuobjdump, shipped with Triton's NVIDIA
    backend), and how many of its programs fit one SM at once by registers, shared memory and warps (approximate:
    allocation granularity left out). {} where cuobjdump is missing."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if not found:
        return {}
    regs, stack, local = (int(v) for v in found.groups())
    fit = min(SM_REGS // max(1, regs * 32 * num_warps), SM_SHARED // (kernel.metadata.shared + SHARED_RESERVED),
              SM_WARPS // num_warps)
    return {"registers": regs, "spilled_bytes": stack + local, "programs_per_sm": fit}  # spilled: per thread


def install(arch: int, compiled: list[dict]) -> None:
    """Every kernel launch from now on compiles its variant for `arch` (recorded in `compiled`) and launches
    nothing: the wrappers return their outputs unwritten. (Replaces two methods of Triton's JITFunction, as
    written for triton 3.9; exits with UNSUPPORTED where their signatures differ.)"""
    import inspect

    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    expected = ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"]
    if list(inspect.signature(getattr(JITFunction, "_do_compile", lambda: None)).parameters) != expected \
            or not hasattr(driver, "set_active"):
        print(json.dumps({"bench": "compile_kernels", "error": "unsupported triton version"}), flush=True)
        sys.exit(UNSUPPORTED)

    def compile_only(self: JITFunction, key: Any, signature: Any, device: Any, constexprs: Any, options: Any,
                     attrs: Any, warmup: bool) -> None:
        kernel_cache = self.device_caches[device][0]
        if key in kernel_cache:
            return None
        t = time.perf_counter()
        src = self.ASTSource(self, signature, constexprs, attrs)
        kernel = self.compile(src, target=driver.active.get_current_target(), options=options.__dict__)
        kernel_cache[key] = kernel  # each variant compiles once
        compiled.append({"kernel": self.fn.__name__, "shared_bytes": kernel.metadata.shared,
                         "num_warps": options.num_warps, **resources(kernel, options.num_warps),
                         "compile_s": round(time.perf_counter() - t, 2)})
        return None

    def run(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        original_run(self, *args, grid=grid, warmup=True, **kwargs)  # warm-up: compile, never launch
        return None

    original_run = JITFunction.run
    JITFunction._do_compile = compile_only
    JITFunction.run = run
    driver.set_active(CompileOnlyDriver(arch))


def calls(shape: str, dtype: Any, pdl: bool) -> list[tuple[str, Callable[[], Any]]]:
    """The wrappers' calls a decode step (1 and 16 rows, 256 for the rest; the decode kernel at 1 and 256) and a
    prefill chunk make at `shape`."""
    import torch

    import asyncllm_kernels as K

    hidden, hq, hk, dim, inter, vocab, qk_norm = SHAPES[shape]
    block_size, blocks, width = 16, 64, 8
    cache = torch.zeros(2, blocks, block_size, hk, dim, dtype=dtype)
    cos_sin = torch.zeros(4096, dim, dtype=torch.float32)
    w = {n: torch.zeros(o, i, dtype=dtype) for n, (o, i) in
         {"qkv": ((hq + 2 * hk) * dim, hidden), "o": (hidden, hq * dim), "gate_up": (2 * inter, hidden),
          "down": (hidden, inter)}.items()}
    norm_w = torch.ones(hidden, dtype=dtype)
    out: list[tuple[str, Callable[[], Any]]] = []
    for rows in (1, 16, 256):
        x = torch.zeros(rows, hidden, dtype=dtype)
        tag = f"{shape} {dtype} rows={rows} pdl={pdl}"
        ints = torch.zeros(rows, dtype=torch.int64)
        q = torch.zeros(rows, hq, dim, dtype=dtype)
        k = torch.zeros(rows, hk, dim, dtype=dtype)
        v = torch.zeros(rows, hk, dim, dtype=dtype)
        norms = (torch.ones(dim, dtype=dtype), torch.ones(dim, dtype=dtype)) if qk_norm else (None, None)
        out += [
            (f"rms_norm {tag}", lambda x=x: K.rms_norm(x, norm_w, 1e-6, pdl=pdl)),
            (f"rms_norm+residual {tag}", lambda x=x: K.rms_norm(x, norm_w, 1e-6, residual=x.clone(), pdl=pdl)),
            (f"rope_store_kv {tag}", lambda q=q, k=k, v=v, ints=ints: K.rope_store_kv(
                ints, q, k, v, cos_sin, cache, ints, norms[0], norms[1], 1e-6, pdl=pdl)),
            (f"store_kv {tag}", lambda k=k, v=v, ints=ints: K.store_kv(k, v, cache, ints, pdl=pdl)),
            (f"silu_and_mul {tag}", lambda x=torch.zeros(rows, 2 * inter, dtype=dtype): K.silu_and_mul(x, pdl=pdl)),
        ]
        if rows != 16:  # the decode kernel at 16 rows differs from 1 row only in its SPLITS (both merge chunks)
            tables = torch.zeros(rows, width, dtype=torch.int64)
            out += [
                (f"paged_decode_attention {tag}", lambda q=q, ints=ints, tables=tables: K.paged_decode_attention(
                    q, cache, tables, ints, dim ** -0.5, 8192, pdl=pdl)),
                (f"paged_decode_attention new token {tag}", lambda q=q, k=k, v=v, ints=ints, tables=tables:
                    K.paged_decode_attention(q, cache, tables, ints, dim ** -0.5, 8192, pdl=pdl,
                                             new=K.NewToken(k, v, ints, ints, cos_sin, *norms, 1e-6))),
            ]
        if rows <= K.SKINNY_MAX_ROWS:
            for name, weight in w.items():
                out.append((f"skinny_linear {name} {tag}", lambda x=x, weight=weight, rows=rows: K.skinny_linear(
                    x if weight.shape[1] == hidden else torch.zeros(rows, weight.shape[1], dtype=dtype), weight,
                    pdl=pdl)))
            out += [
                (f"skinny_linear bias {tag}", lambda x=x: K.skinny_linear(  # Qwen2's q|k|v
                    x, w["qkv"], torch.zeros(w["qkv"].shape[0], dtype=dtype), pdl=pdl)),
                (f"skinny_linear swiglu {tag}", lambda x=x: K.skinny_linear(x, w["gate_up"], swiglu=True, pdl=pdl)),
            ]
        if not pdl:  # launched without it in the engine
            for world in (4,):  # tensor parallelism's all-reduce + residual add + norm (pointers: never read)
                ptrs = torch.zeros(world, dtype=torch.int64)
                out.append((f"all_reduce_add_rms_norm world={world} {tag}", lambda x=x, ptrs=ptrs:
                            K.all_reduce_add_rms_norm(x, x.clone(), norm_w, 1e-6, ptrs, ptrs, 0, x.numel(), 0)))
            logits = torch.zeros(min(rows, 16), vocab, dtype=dtype)
            n = logits.shape[0]
            params = (torch.ones(n), torch.zeros(n, dtype=torch.int64), torch.ones(n), torch.zeros(n),
                      torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))
            table = torch.zeros(rows + 1, width, dtype=torch.int64)
            out += [
                (f"sample {tag}", lambda logits=logits, params=params: K.sample(logits, *params)),
                (f"sample rows {tag}", lambda logits=logits, params=params, n=n: K.sample(
                    logits, *params, rows=torch.arange(n), position_offset=1)),
                (f"apply_token_bitmask_ {tag}", lambda logits=logits, n=n: K.apply_token_bitmask_(
                    logits, torch.arange(n), torch.zeros(n, (vocab + 31) // 32, dtype=torch.int32))),
                (f"decode_inputs {tag}", lambda ints=ints, table=table, rows=rows: K.decode_inputs(
                    ints, ints, ints, table, torch.zeros(rows, dtype=torch.int64), rows, block_size)),
            ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                    choices=["bfloat16", "float16", "float32"], help=f"at {DTYPES_SHAPE} (the other shapes: bfloat16)")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        sys.exit("compile_kernels.py compiles for a GPU: unset TRITON_INTERPRET")
    import torch

    from asyncllm_kernels import device_shape

    device_shape.CPU_SMS = SMS
    compiled: list[dict] = []
    install(a.arch, compiled)
    failures = 0
    fields = run_fields(f"sm_{a.arch} (compiled on cpu, none launched)")
    t0 = time.perf_counter()
    for shape in a.shapes:
        # bf16 at every shape, fp16 and fp32 (the GPU tests' dtype) at one: a dtype's variants differ little by shape
        for dtype in [getattr(torch, d) for d in a.dtypes] if shape == DTYPES_SHAPE else (torch.bfloat16,):
            for pdl in (False, True):
                for name, call in calls(shape, dtype, pdl):
                    before = len(compiled)
                    try:
                        call()
                    except Exception as e:  # a compile error names the kernel's line
                        failures += 1
                        print(json.dumps({"call": name, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
                        traceback.print_exc(limit=2, file=sys.stderr)
                    for c in compiled[before:]:
                        c["call"] = name
                        if c["shared_bytes"] > MAX_SHARED.get(a.arch, MAX_SHARED[90]):
                            failures += 1
                            c["error"] = "more shared memory than a block may have"
                        print(json.dumps({**c, **fields}), flush=True)
    print(json.dumps({"bench": "compile_kernels", "arch": a.arch, "variants": len(compiled), "failures": failures,
                      "seconds": round(time.perf_counter() - t0, 1), **fields}), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
