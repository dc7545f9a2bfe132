"""Small C helpers (plain C, no Python API) built once per version of their source with the system C compiler into
the cache directory, and loaded with ctypes."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from asyncllm.model_files import cache_dir


def load_native(source: Path) -> ctypes.PyDLL:
    """`source` compiled (cached by its hash) and loaded as a ctypes.PyDLL: its calls keep the GIL, for calls that
    return at once (`ctypes.CDLL(lib._name)` gives the same library with calls that let it go). Raises OSError or
    SubprocessError where it cannot be built (no C compiler, not Linux)."""
    if not sys.platform.startswith("linux"):
        raise OSError("native helpers are built on Linux only")
    code = source.read_bytes()
    so = cache_dir() / f"{source.stem}-{hashlib.sha256(code).hexdigest()[:16]}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(source)],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, so)  # atomic: a concurrent build by another process is never seen half-written
    return ctypes.PyDLL(str(so))
