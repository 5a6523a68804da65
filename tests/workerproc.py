"""Runs `spa-worker`: the entry point that Jobs and the local executor run.

By default a worker is forked from one warm server per test session (spa_operator.warm, as `spa run` starts its
stages), so the suite imports torch, transformers, TRL and vLLM once instead of once per worker; it behaves as a
fresh `python -m spa_workers.cli` process (its own process, environment, working directory, stdout and stderr, exit
code). Multi-process training stages, argument lists that do not parse, `cold=True` and SPA_COLD_START=1 run the
fresh process itself; so do the operator tests (their harness runs each Job's command) and `spa run --cold`.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from spa_operator import warm
from spa_workers import contract, preload

ROOT = Path(__file__).parent.parent
_server: warm.WarmServer | None = None


def _warm_server() -> warm.WarmServer:
    """The session's server, started at the first warm worker with every stage's libraries (vLLM's too)."""
    global _server
    if _server is None:
        modules = [*preload.TRAINING, *preload.VLLM, *preload.JUDGE_CLIENT,
                   *(f"spa_workers.{m}" for m in ("validate", "generate", "judge", "evaluate"))]
        _server = warm.WarmServer(modules, dict(os.environ), Path(tempfile.mkdtemp(prefix="spa-test-warm-")))
        _server.start()
        atexit.register(_server.stop)
    return _server


def _forkable(argv: tuple[str, ...]) -> bool:
    try:
        args = contract.ARGS_BY_STAGE[argv[0]].from_argv(list(argv[1:]))
    except BaseException:  # unknown stage, bad arguments: the fresh process reports them as it always did
        return False
    return warm.eligible(args)


def run_worker(*argv: str, env: dict[str, str] | None = None, timeout: float = 900,
               cold: bool = False) -> subprocess.CompletedProcess:
    """Run `spa-worker ARGV` (forked from the session's warm server unless `cold`) and return how it went."""
    full_env = {**os.environ, **(env or {})}
    command = [sys.executable, "-m", "spa_workers.cli", *argv]
    if cold or warm.cold_requested() or not _forkable(argv):
        return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="spa-test-worker-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        stage = _warm_server().start_stage(list(argv), full_env, out, stderr=err, cwd=ROOT)
        code = stage.wait(timeout)
        if code is None:
            stage.send_signal(signal.SIGKILL)
            stage.wait(10)
            raise subprocess.TimeoutExpired(command, timeout)
        stderr = err.read_text(errors="replace")
        if stderr.startswith("warm start: "):  # what the fresh process would have printed, nothing more
            stderr = stderr.split("\n", 1)[1] if "\n" in stderr else ""
        return subprocess.CompletedProcess(command, code, out.read_text(errors="replace"), stderr)
