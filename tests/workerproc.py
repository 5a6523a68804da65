"""Runs `spa-worker` as a subprocess: the real entry point that Jobs and the local executor run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_worker(*argv: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `spa-worker ARGV` as a subprocess (the real entry point) and return the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "spa_workers.cli", *argv], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=Path(__file__).parent.parent)
