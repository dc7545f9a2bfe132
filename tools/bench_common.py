"""What every benchmark line carries: device, date, commit (ASYNCLLM_COMMIT on machines without git)."""
from __future__ import annotations

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
