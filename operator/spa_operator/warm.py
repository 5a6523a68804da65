"""The warm start of `spa run`: each stage is still its own process, but forked from a server that has already
imported the workers' libraries, so a run pays the imports of torch, transformers, TRL (and vLLM when a stage uses
it) once instead of once per stage.

The mechanism is the standard library's `multiprocessing` forkserver with `set_forkserver_preload`: it starts one
server process (a fresh interpreter, not a fork of `spa run`), imports the preload modules there, and forks a child
per stage on request, passing the child's pid and exit status back over pipes. Chosen over a fork of `spa run`
itself (the executor has threads: rich's live display), over a hand-written zygote (the forkserver already handles
fd passing, exit statuses, SIGCHLD and a server that dies with its client) and over spawn (which re-imports).

What keeps a forked stage the same as a fresh `python -m spa_workers.cli` process:
- Threads: the server only imports (`spa_workers.preload` names the modules; none runs a torch op, a tokenizer or
  CUDA), so neither torch's OpenMP pool nor tokenizers' rayon pool exists when it forks. The threads importing
  does start (OpenBLAS's pool under numpy and scipy, pyarrow's jemalloc background thread) have fork handlers,
  as in any process that imports numpy and forks. Each stage log says which threads the server had.
- Environment: the server starts with the stage environment of the run (variables read at import time, such as
  OMP_WAIT_POLICY by OpenMP or HF_HUB_OFFLINE by huggingface_hub, see the same values); each child then sets
  `os.environ` and `sys.argv` to exactly what the cold process would have.
- Output and exit codes: the child points fds 1 and 2 at the stage's log file; the server reports its exit status
  as `Popen` would (negative for a signal). atexit handlers run in the child, as at a normal interpreter exit.
- Ctrl-C: the server ignores SIGINT; the child restores Python's handler, so the terminal's SIGINT stops the
  stage as it stops a cold one. On an interrupt `spa run` waits briefly for the stage to end before it exits.
- vLLM: the child is not daemonic, so vLLM may start its engine and worker processes (on CPU vLLM always spawns
  them: VLLM_WORKER_MULTIPROC_METHOD=spawn; a spawned process re-imports, it does not inherit the warm imports).
- Multi-process training stages (`--processes N`) start cold: they re-run themselves under `accelerate launch`,
  whose ranks are fresh interpreters anyway.

`spa run --cold` or SPA_COLD_START=1 keeps the plain subprocess path.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path

from spa_workers.contract import StageArgs, TrainArgs

COLD_ENV = "SPA_COLD_START"  # "1": every stage starts as a fresh `python -m spa_workers.cli` process
SERVER_LOG_ENV = "SPA_WARM_SERVER_LOG"  # set only in the server's environment: where its own output goes
SERVER_MODULES_ENV = "SPA_WARM_SERVER_MODULES"  # and the modules it imports, comma-separated
READY = "warm server: ready"  # the line the server logs once it has imported them
_STARTING = threading.Lock()  # one stage start at a time (each swaps sys.modules["__main__"] for a moment)
SERVER_LOG = "warm-server.log"
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C: how long `spa run` waits for the stage to stop on its own
EXIT_UNKNOWN = 255  # multiprocessing's exit code for a stage whose server died: its manifest decides


def cold_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(COLD_ENV, "").lower() in ("1", "true", "yes")


def eligible(args: StageArgs) -> bool:
    """Whether a stage may start warm: not a multi-process training stage, which re-runs itself under `accelerate
    launch` (its ranks are fresh interpreters anyway)."""
    return not (isinstance(args, TrainArgs) and args.processes * args.nodes > 1)


class WarmStage:
    """A stage process forked from the warm server, polled like a `subprocess.Popen`."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def poll(self) -> int | None:
        code = self.process.exitcode
        # The server reaps a stage before it reports its exit code; a code while the stage still runs means the
        # server is gone (multiprocessing then says 255): the stage runs on, its exit code unknown.
        if code is not None and _alive(self.process.pid):
            return None
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self.process.join(timeout)
        while self.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None and self.process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)


class WarmServer:
    """One forkserver for one `spa run`: started with the run's stage environment, stopped at the end."""

    def __init__(self, modules: list[str], env: dict[str, str], logs: Path) -> None:
        self.modules = list(dict.fromkeys(modules))
        self.env = env
        self.log = logs / SERVER_LOG
        self.context = multiprocessing.get_context("forkserver")
        self.ready = False

    def start(self) -> None:
        """Start the server; it imports in the background (the first stage waits for it)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        # The forkserver imports this module, which imports the rest itself (`_serve`): it logs what fails to
        # import instead of skipping it silently, and says when it is ready.
        self.context.set_forkserver_preload([__name__])
        server_env = {**self.env, SERVER_LOG_ENV: str(self.log), SERVER_MODULES_ENV: ",".join(self.modules)}
        with _environment(server_env), _sigint_ignored():
            forkserver.ensure_running()

    def wait_ready(self) -> None:
        """Wait until the server has imported everything. A request sent earlier would wait inside the server, and
        a Ctrl-C meanwhile would leave it to start a stage after `spa run` had stopped; this wait is interruptible
        and sends nothing. Raises `Unavailable` if the server ended first."""
        while not self.ready:
            with contextlib.suppress(FileNotFoundError):
                self.ready = READY in self.log.read_text(errors="replace")
            if self.ready:
                break
            if not _alive(self._pid()):
                raise Unavailable(f"the warm server exited while importing (its log: {self.log})")
            time.sleep(0.05)

    def start_stage(self, argv: list[str], env: dict[str, str], log: Path, stderr: Path | None = None,
                    cwd: Path | None = None) -> WarmStage:
        """Fork a stage process from the server (`Unavailable` if there is no server to fork from): `spa-worker
        ARGV` with `env`, its output to `log` (its stderr to `stderr` when given), in `cwd` (default: this one's)."""
        self.wait_ready()
        if not _alive(self._pid()):
            raise Unavailable(f"the warm server has exited (its log: {self.log})")
        # A cold stage inherits this process's SIGINT disposition: ignored (a background job, nohup) or not.
        ignore_sigint = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        outputs = (str(log), str(stderr or log))
        process = self.context.Process(target=_stage_main, args=(argv, env, outputs, ignore_sigint, cwd),
                                       name="spa-stage")
        with _STARTING, _main_module_hidden():
            process.start()
        return WarmStage(process)

    def stop(self) -> None:
        """Stop the server now (it would also end by itself once `spa run` and its stages have exited)."""
        pid = self._pid()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGTERM)  # no waiting for it to notice, or for stages that outlived `spa run`
        stop = getattr(forkserver._forkserver, "_stop", None)  # reaps it (the standard library's tests stop it so)
        if stop is not None:
            stop()

    @staticmethod
    def _pid() -> int | None:
        return getattr(forkserver._forkserver, "_forkserver_pid", None)


class Unavailable(Exception):
    """No warm server to fork a stage from: the stage starts cold."""


def _alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a child that ended but was not reaped yet is a zombie: not alive)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """This process's environment set to `env` for a moment (the server inherits it when spawned)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in saved]:
            del os.environ[key]
        os.environ.update(saved)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """The server (and multiprocessing's resource tracker, started with it) never take Ctrl-C, even while the
    interpreter starts and imports: they inherit an ignored SIGINT, which Python then leaves ignored. Ctrl-C is for
    `spa run` and its stages (`_stage_main` restores the handler)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """multiprocessing re-imports the parent's __main__ in every child it starts; a stage needs nothing from it (its
    code is `_stage_main`), and a script that calls `spa` without an `if __name__ == "__main__"` guard would run
    again in each stage. An empty stand-in while the child's start-up data is taken avoids both."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def server_threads(pid: int) -> list[str]:
    """The names of a process's threads (Linux /proc; empty elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task")):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
    return names


def _stage_main(argv: list[str], env: dict[str, str], outputs: tuple[str, str], ignore_sigint: bool = False,
                cwd: Path | None = None) -> None:
    """In the forked child: become what `python -m spa_workers.cli ARGV` with `env` and its stdout and stderr
    going to `outputs` would be."""
    for target, path in zip((1, 2), outputs, strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.dup2(fd, target)
        os.close(fd)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.default_int_handler)
    from spa_workers import cli

    sys.argv = [cli.__file__, *argv]
    threads = server_threads(os.getppid())
    print(f"warm start: forked from the server (pid {os.getppid()}; its threads: {', '.join(threads) or '?'}) as "
          f"pid {os.getpid()}", file=sys.stderr, flush=True)
    code = 1
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # the forkserver ends its children with os._exit, which skips them
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    if code == -signal.SIGINT:  # like an interpreter stopped by Ctrl-C: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


def _serve() -> None:
    """In the server, as it imports this module: its own output to its log file, the workers' environment
    defaults, then every module the stages need; a module that fails to import is logged and left to the stages."""
    t0 = time.time()
    fd = os.open(os.environ.pop(SERVER_LOG_ENV), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from spa_workers.preload import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    modules = [m for m in os.environ.pop(SERVER_MODULES_ENV, "").split(",") if m]
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            failed.append(name)
            traceback.print_exc()
    print(f"{READY} in {time.time() - t0:.1f}s: {len(modules) - len(failed)} of {len(modules)} modules imported"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; threads: "
          f"{', '.join(server_threads(os.getpid())) or '?'}", flush=True)


if os.environ.get(SERVER_LOG_ENV):  # imported by the forkserver as its preload (WarmServer.start)
    _serve()
