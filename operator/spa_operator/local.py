"""The local executor: carries out the planner's decisions as `spa-worker` subprocesses on this machine.

It holds no pipeline logic: what is done is read from stage manifests in storage, what runs next comes from
`plan_next_stage`. Stage logs go to `<logs>/<iteration>-<stage>-a<attempt>[-s<shard>].log`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from spa_workers import contract, fingerprint, preload, storage
from spa_workers.contract import EXIT_BAD_INPUT, StageArgs
from spa_workers.runner import output_of

from spa_operator import warm
from spa_operator.fields import spec_field
from spa_operator.planner import (
    Action,
    Plan,
    PlannedStage,
    StageResult,
    StageState,
    plan_next_stage,
    resolve_strategy,
    stage_graph,
)
from spa_operator.spec import AlignmentRun


def run_root(run: AlignmentRun, storage_uri: str) -> str:
    return storage.join(storage_uri, run.metadata.namespace, run.metadata.name)


def storage_settings(run: AlignmentRun) -> dict[str, str]:
    """The run's S3 endpoint and region as environment variables (they win over the environment's own;
    credentials always come from the environment: a secretRef names a cluster Secret)."""
    st = run.spec.storage
    env = {}
    if st and st.endpoint:
        env["SPA_S3_ENDPOINT"] = st.endpoint
    if st and st.region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = st.region
    return env


def stage_env(run: AlignmentRun) -> dict[str, str]:
    """Environment for workers: this process's, with the run's storage settings."""
    env = {**os.environ, **storage_settings(run)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def local_gpus() -> int:
    """GPUs this machine's processes can use: the NVIDIA driver's, narrowed by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def requested_env(stage: PlannedStage, gpus_here: int) -> dict[str, str]:
    """What a stage holds here, for its ledger's accelerator-seconds: a worker takes a GPU whenever one is visible,
    a train stage one per process, a vLLM engine one per tensor-parallel rank, as far as the machine has them."""
    args = stage.args
    wanted = (args.processes if isinstance(args, contract.TrainArgs)
              else getattr(args, "tensor_parallel_size", 1) if stage.stage != contract.VALIDATE else 0)
    return {contract.REQUESTED_GPUS_ENV: str(min(wanted, gpus_here))}


def apply_storage_settings(run: AlignmentRun) -> None:
    """Make this process reach storage as the workers will (`spa run` reads manifests and writes reports)."""
    os.environ.update(storage_settings(run))
    storage.reset_client()


class StageCheck(StrEnum):
    MISSING = "missing"  # no manifest, or not every shard has one
    DONE = "done"  # every manifest matches the fingerprint this run's spec gives
    STALE = "stale"  # a manifest was made with other settings or inputs


@dataclass(frozen=True)
class StageStatus:
    key: str
    check: StageCheck
    change: str = ""  # for STALE: what differs, e.g. "learning_rate 5e-05 -> 0.0001"
    follows: tuple[str, ...] = ()  # for STALE: the stale stages upstream whose outputs it took
    metrics: dict[str, float] = field(default_factory=dict)  # for DONE: the (first shard's) manifest metrics


def _shard_args(stage: PlannedStage) -> list[StageArgs]:
    if not stage.args.sharded:
        return [stage.args]
    return [replace(stage.args, shard_index=i) for i in range(stage.shards)]  # type: ignore[call-arg]


def check_stages(graph: list[PlannedStage]) -> dict[str, StageStatus]:
    """Each stage's state in storage, with fingerprints computed from the spec (as the worker would record them,
    given that every upstream stage is redone to match the spec)."""
    identity: dict[str, str] = {}  # input URI -> identity; stage outputs get their expected fingerprint
    producer: dict[str, str] = {}  # stage output URI -> stage key
    out: dict[str, StageStatus] = {}
    for s in graph:
        inputs = {}
        for name, uri in fingerprint.input_uris(s.args).items():
            if uri not in identity:
                identity[uri] = fingerprint.input_identity(uri)
            inputs[name] = identity[uri]
        expected = [fingerprint.fingerprint(a, inputs) for a in _shard_args(s)]
        dirs = contract.stage_manifest_dirs(s.args)
        manifests = [contract.read_manifest(d) for d in dirs]
        stale = [(m, of) for m, (fp, of) in zip(manifests, expected, strict=True) if m and m.fingerprint != fp]
        if s.args.sharded:  # shards of another shard count would mix into what the next stage reads
            others = [contract.read_manifest(d) for d in storage.list_dirs(s.output)
                      if os.path.basename(d).startswith("shard-") and d not in dirs]
            stale += [(m, expected[0][1]) for m in others if m]
        if stale:
            m, of = stale[0]
            upstream = tuple(sorted({producer[u] for n, u in fingerprint.input_uris(s.args).items()
                                     if u in producer and out[producer[u]].check is not StageCheck.DONE
                                     and m.fingerprint_of.get("inputs", {}).get(n) != inputs[n]}))
            out[s.key] = StageStatus(s.key, StageCheck.STALE,
                                     fingerprint.describe_change(m.fingerprint_of, of, _namer(s, producer)), upstream)
        elif all(manifests):
            out[s.key] = StageStatus(s.key, StageCheck.DONE, metrics=dict(manifests[0].metrics))
        else:
            out[s.key] = StageStatus(s.key, StageCheck.MISSING)
        fps = [fp for fp, _ in expected]
        whole = fingerprint.combine_shards(fps) if s.args.sharded else fps[0]
        for uri in (s.output, storage.join(s.output, contract.MODEL_SUBDIR)):
            identity[uri] = whole
            producer[uri] = s.key
    return out


def _namer(stage: PlannedStage, producer: dict[str, str]) -> Callable[[str], str]:
    """A stage's arguments as a user knows them: the manifest field, or the stage whose output an input is."""
    uris = fingerprint.input_uris(stage.args)

    def name(arg: str) -> str:
        return producer.get(uris.get(arg, ""), "") or spec_field(stage.stage, arg) or arg
    return name


def dependents(graph: list[PlannedStage], key: str) -> list[str]:
    """`key` and every stage that depends on it, directly or not, in graph order."""
    found = {key}
    for s in graph:
        if any(d in found for d in s.depends_on):
            found.add(s.key)
    return [s.key for s in graph if s.key in found]


def finished_results(graph: list[PlannedStage]) -> dict[str, StageResult]:
    """Stages whose manifests (every shard's) exist in storage with the fingerprint the spec gives, with their
    metrics (the first shard's: only unsharded stages, evaluate among them, carry metrics the planner reads)."""
    return {k: StageResult(StageState.SUCCEEDED, metrics=st.metrics) for k, st in check_stages(graph).items()
            if st.check is StageCheck.DONE}


@dataclass
class StageRun:
    key: str
    attempt: int
    ok: bool
    exit_code: int
    seconds: float
    log: str


ProgressFn = Callable[[PlannedStage, int, float], None]  # (stage, shard, fraction 0..1)


class StageProcess(Protocol):
    """A running stage: a `subprocess.Popen` (cold start) or a `warm.WarmStage`."""

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...


def _read_progress(uri: str) -> float | None:
    try:
        return float(json.loads(storage.read_text(storage.join(uri, contract.PROGRESS)))["fraction"])
    except (FileNotFoundError, ValueError, KeyError, storage.StorageError):
        return None


def _start_stage(args: StageArgs, env: dict[str, str], log: Path, server: warm.WarmServer | None) -> StageProcess:
    env = {**env, preload.SCHEDULED_AT_ENV: repr(time.time())}
    if server is not None and warm.eligible(args):
        try:
            return server.start_stage(args.to_argv(), env, log)
        except warm.Unavailable as e:
            log.write_text(f"warm start unavailable: {e}; starting cold\n")
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "spa_workers.cli", *args.to_argv()], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)


def _stop_after_interrupt(proc: StageProcess) -> None:
    """After Ctrl-C (which the stage, in the same process group, got too) wait for the stage to stop, so nothing
    still writes once `spa run` has said it stopped; a stage that outlives the grace period is terminated."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(warm.INTERRUPT_GRACE_S if sig is None else 5)
        if proc.poll() is not None:
            return


def run_stage_process(stage: PlannedStage, attempt: int, env: dict[str, str], logs: Path,
                      on_progress: ProgressFn | None = None, server: warm.WarmServer | None = None) -> StageRun:
    """Run every shard of a stage (one after another here) and report how it went. With `server`, the stage
    process is forked from the warm server instead of started afresh (see `warm`)."""
    t0 = time.time()
    code = 0
    log = logs / f"{stage.key.replace('/', '-')}-a{attempt}.log"
    logs.mkdir(parents=True, exist_ok=True)
    for shard in range(stage.shards):
        args = replace(stage.args, shard_index=shard) if stage.args.sharded else stage.args  # type: ignore[call-arg]
        shard_log = log.with_suffix(f".s{shard}.log") if stage.shards > 1 else log
        out = output_of(args)
        shard_log.write_bytes(b"")
        proc = _start_stage(args, env, shard_log, server)
        try:
            while proc.poll() is None:
                if on_progress:
                    frac = _read_progress(out)
                    if frac is not None:
                        on_progress(stage, shard, frac)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.5)  # returns as soon as the stage ends: the next one starts at once
        except BaseException:
            _stop_after_interrupt(proc)
            raise
        code = proc.poll()
        if code != 0:
            log = shard_log
            break
        if on_progress:
            on_progress(stage, shard, 1.0)
    # A stage is done when its manifests exist (with the warm server lost, its exit code is unknown)
    ok = code in (0, warm.EXIT_UNKNOWN) and contract.read_stage_manifests(stage.args) is not None
    return StageRun(stage.key, attempt, ok, code, time.time() - t0, str(log))


def last_error_line(log_path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    errors = [ln for ln in lines if "error:" in ln.lower()]
    return (errors or lines or [""])[-1][:500]


def local_launch(stage: PlannedStage, processes: int | None) -> PlannedStage:
    """A train stage as it runs here: on one node, with `processes` processes when given (else its GPU count)."""
    args = stage.args
    if not isinstance(args, contract.TrainArgs):
        return stage
    n = processes or args.processes
    strategy = resolve_strategy(args.strategy, args.lora_r > 0, n)
    return replace(stage, args=replace(args, nodes=1, processes=n, strategy=strategy))


@dataclass(frozen=True)
class Outcome:
    plan: Plan  # DONE or FAILED
    permanent: bool = False  # FAILED on bad input (exit 2): rerunning as is cannot help


def warm_modules(graph: list[PlannedStage]) -> list[str]:
    """What the run's stages import before their first work: the warm server imports it once."""
    return list(dict.fromkeys(m for s in graph for m in preload.modules_for(s.args)))


def start_warm_server(run: AlignmentRun, root: str, logs: Path | None = None,
                      processes: int | None = None) -> warm.WarmServer:
    """The warm server for this run's stages, importing in the background from now on (`warm`)."""
    graph = [local_launch(s, processes) for s in stage_graph(run.spec, root)]
    server = warm.WarmServer(warm_modules(graph), stage_env(run), logs or Path(root) / "logs")
    server.start()
    return server


def execute(run: AlignmentRun, root: str, logs: Path, on_start: Callable[[PlannedStage, int], None] | None = None,
            on_progress: ProgressFn | None = None, on_finish: Callable[[StageRun], None] | None = None,
            processes: int | None = None, cold: bool = False, server: warm.WarmServer | None = None) -> Outcome:
    """Drive the run to DONE or FAILED. `processes`: training processes here (`local_launch`); `cold`: start every
    stage as a fresh process instead of forking it from the warm server (`warm`), which is started with the first
    stage to run unless `server` is one already started."""
    graph = stage_graph(run.spec, root)
    env = stage_env(run)
    gpus_here = local_gpus()
    failures: dict[str, StageResult] = {}
    while True:
        results = {**failures, **finished_results(graph)}
        plan = plan_next_stage(run.spec, root, results)
        if plan.action is not Action.START:
            failed = failures.get(plan.failed_stage or "")
            if server is not None:
                server.stop()
            return Outcome(plan, permanent=bool(failed and failed.permanent))
        # Locally stages run one at a time, in plan order.
        todo = plan.start[0]
        stage = local_launch(todo.stage, processes)
        if server is None and not cold:  # started with the first stage to run: a finished run needs none
            server = start_warm_server(run, root, logs, processes)
        if on_start:
            on_start(todo.stage, todo.attempt)
        result = run_stage_process(stage, todo.attempt, {**env, **requested_env(stage, gpus_here)}, logs,
                                   on_progress, server)
        if on_finish:
            on_finish(result)
        if not result.ok:
            prev = failures.get(todo.stage.key)
            failures[todo.stage.key] = StageResult(
                StageState.FAILED, failures=(prev.failures if prev else 0) + 1,
                permanent=result.exit_code == EXIT_BAD_INPUT,
                reason=last_error_line(result.log) or f"exit code {result.exit_code}")
