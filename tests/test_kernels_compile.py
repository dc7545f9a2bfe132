"""The Triton kernels compile for the GPUs the engine targets, checked without one: tools/compile_kernels.py in a
process of its own (Triton's interpreter, which the other kernel tests turn on, never runs the GPU compiler)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
TOOL = Path(__file__).resolve().parents[1] / "tools" / "compile_kernels.py"
UNSUPPORTED = 3  # the tool's exit status where it cannot hook this Triton


def test_every_kernel_variant_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # two processes (CI has two cores) of about the same work: Qwen3-0.6B's shape in bf16 and fp32, the other two
    # shapes in bf16 (fp16, whose code is bf16's but for the type, is left to the tool's own default run)
    procs = [subprocess.Popen([sys.executable, str(TOOL), "--arch", "90", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (["--shapes", "qwen3-0.6b", "--dtypes", "bfloat16", "float32"],
                          ["--shapes", "smollm2-135m", "llama-3.1-8b"])]
    compiled = set()
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode == UNSUPPORTED:
            pytest.skip("this Triton's JIT internals are not the ones tools/compile_kernels.py replaces")
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert lines, err[-3000:]
        errors = [line for line in lines if "error" in line]
        assert not errors and p.returncode == 0, (errors[:5], err[-3000:])
        summary = lines[-1]
        assert summary["bench"] == "compile_kernels" and summary["failures"] == 0 and summary["variants"] > 0
        compiled |= {line["kernel"] for line in lines[:-1]}
    # every kernel a decode step or a prefill chunk of the fast path launches
    assert {"_rmsnorm_kernel", "_rope_store_kv_kernel", "_store_kv_kernel", "_decode_kernel", "_silu_and_mul_kernel",
            "_skinny_kernel", "_threshold_kernel", "_draw_kernel", "_apply_kernel", "_decode_inputs_kernel",
            "_all_reduce_norm_kernel"} <= compiled
