"""Python code run in an interpreter of its own: what a module does when it is imported (torchnode's choices
of OpenMP's and gRPC's environment) or what torch keeps per thread can only be seen where nothing has run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable


def run_code(code: str, drop: Iterable[str] = (), check: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` with this process's environment less the variables in `drop`, plus `env`; its output
    captured as text."""
    dropped = set(drop)
    base = {k: v for k, v in os.environ.items() if k not in dropped}
    return subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=check, timeout=120
    )
