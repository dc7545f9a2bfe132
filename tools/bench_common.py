"""What every benchmark line carries: device, date, commit (ASYNCLLM_COMMIT on machines without git)."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time


def run_fields(device: str | None = None) -> dict:
    commit = os.environ.get("ASYNCLLM_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if device is None:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {platform.machine()}"
    return dict(device=device, date=time.strftime("%Y-%m-%d"), commit=commit)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def variant_config(variant: str) -> dict:
    """'BACKEND[-eager][-no-pieces][-no-overlap][-nccl|-symm][-cublas][-no-pdl][-wide|-wide-swiglu]
    [-rope-apart|-rope-in-decode]' -> engine options: eager = no CUDA graphs,
    no-pieces = no piecewise graphs (steps with prompt tokens eager), no-overlap = each step read back before the
    next is scheduled, nccl / symm = tensor parallelism's all-reduces by NCCL only / by the symmetric-memory kernels
    where small (default: auto), cublas = torch's matmuls at few rows too, no-pdl = no programmatic dependent
    launch; the rest set the layers' choices (set_layer_variant: call before building the engine)."""
    set_layer_variant(variant)
    all_reduce = "nccl" if "-nccl" in variant else "symm_mem" if "-symm" in variant else "auto"
    return dict(attention_backend=variant.split("-")[0], enforce_eager="-eager" in variant,
                overlap_schedule="-no-overlap" not in variant, all_reduce=all_reduce,
                small_matmul="cublas" if "-cublas" in variant else "triton",
                cuda_graph_max_tokens=0 if "-no-pieces" in variant else None,
                dependent_launch="-no-pdl" not in variant)


@functools.cache
def _layers_defaults() -> tuple[int, int, int]:
    """The layers' own bounds (plain, gate|up with SwiGLU) and ROPE_IN_DECODE_MAX_SEQS, read before any variant
    changes them."""
    from asyncllm.layers import attention, linear

    return linear.SKINNY_MAX_OUT, linear.SKINNY_SWIGLU_MAX_OUT, attention.ROPE_IN_DECODE_MAX_SEQS


def set_layer_variant(variant: str) -> None:
    """'-wide' in the variant: the few-row Triton matmul for every layer, however wide; '-wide-swiglu': for every
    gate|up layer (SwiGLU in its epilogue), the others as by default (the layers read these when built: call before
    the engine); '-rope-in-decode' / '-rope-apart': the rotary embedding and the new token's KV store in the decode
    attention kernel at every batch size / at none (asyncllm.layers.attention.ROPE_IN_DECODE_MAX_SEQS; default:
    small batches)."""
    from asyncllm.layers import attention, linear

    plain, swiglu, rope_max_seqs = _layers_defaults()
    attention.ROPE_IN_DECODE_MAX_SEQS = 1 << 30 if "-rope-in-decode" in variant else 0 if "-rope-apart" in variant \
        else rope_max_seqs
    wide = "-wide" in variant.replace("-wide-swiglu", "")
    linear.SKINNY_MAX_OUT = 1 << 30 if wide else plain
    linear.SKINNY_SWIGLU_MAX_OUT = 1 << 30 if wide or "-wide-swiglu" in variant else swiglu


class StepTimer:
    """Per-step host time vs GPU time of an engine: wraps its runner's launch (CUDA events around each step on the
    runner's stream) and the handles' wait (time the host sat idle waiting for the GPU)."""

    def __init__(self, engine) -> None:
        import torch

        self.torch, self.runner = torch, engine.runner
        self.events: list = []
        self.blocked = 0.0
        launch = self.runner.launch

        def timed_launch(batch, **kwargs):
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.runner.stream)
            handle = launch(batch, **kwargs)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.runner.stream)
            self.events.append((start, end))
            wait = handle.wait

            def timed_wait():
                t = time.perf_counter()
                try:
                    return wait()
                finally:
                    self.blocked += time.perf_counter() - t

            if hasattr(handle, "wait"):  # not a deferred step (structured outputs under overlap)
                handle.wait = timed_wait
            return handle

        self.runner.launch = timed_launch

    def reset(self) -> None:
        self.events, self.blocked = [], 0.0

    def summary(self, wall_s: float) -> dict:
        """Mean per step, in ms: wall, GPU busy, host busy (wall minus waiting for the GPU)."""
        self.torch.cuda.synchronize()
        n = max(1, len(self.events))
        gpu = sum(s.elapsed_time(e) for s, e in self.events) / n
        return dict(steps=len(self.events), wall_ms_per_step=round(wall_s * 1e3 / n, 3), gpu_ms_per_step=round(gpu, 3),
                    host_ms_per_step=round((wall_s - self.blocked) * 1e3 / n, 3))
