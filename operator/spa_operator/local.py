"""The local executor: carries out the planner's decisions as `spa-worker` subprocesses on this machine.

It holds no pipeline logic: what is done is read from stage manifests in storage, what runs next comes from
`plan_next_stage`. Stage logs go to `<logs>/<iteration>-<stage>-a<attempt>[-s<shard>].log`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from spa_workers import contract, storage
from spa_workers.contract import EXIT_BAD_INPUT
from spa_workers.runner import output_of

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


def stage_env(run: AlignmentRun) -> dict[str, str]:
    """Environment for workers: the run's S3 endpoint/region (credentials come from this process's env)."""
    env = dict(os.environ)
    st = run.spec.storage
    if st and st.endpoint:
        env["SPA_S3_ENDPOINT"] = st.endpoint
    if st and st.region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = st.region
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def finished_results(graph: list[PlannedStage]) -> dict[str, StageResult]:
    """Stages whose manifests (every shard's) exist in storage."""
    out = {}
    for s in graph:
        if contract.read_stage_manifests(s.args) is not None:
            out[s.key] = StageResult(StageState.SUCCEEDED)
    return out


@dataclass
class StageRun:
    key: str
    attempt: int
    ok: bool
    exit_code: int
    seconds: float
    log: str


ProgressFn = Callable[[PlannedStage, int, float], None]  # (stage, shard, fraction 0..1)


def _read_progress(uri: str) -> float | None:
    try:
        return float(json.loads(storage.read_text(storage.join(uri, contract.PROGRESS)))["fraction"])
    except (FileNotFoundError, ValueError, KeyError, storage.StorageError):
        return None


def run_stage_process(stage: PlannedStage, attempt: int, env: dict[str, str], logs: Path,
                      on_progress: ProgressFn | None = None) -> StageRun:
    """Run every shard of a stage (one after another here) and report how it went."""
    t0 = time.time()
    code = 0
    log = logs / f"{stage.key.replace('/', '-')}-a{attempt}.log"
    logs.mkdir(parents=True, exist_ok=True)
    for shard in range(stage.shards):
        args = replace(stage.args, shard_index=shard) if stage.args.sharded else stage.args  # type: ignore[call-arg]
        shard_log = log.with_suffix(f".s{shard}.log") if stage.shards > 1 else log
        out = output_of(args)
        with open(shard_log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "spa_workers.cli", *args.to_argv()], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                if on_progress:
                    frac = _read_progress(out)
                    if frac is not None:
                        on_progress(stage, shard, frac)
                time.sleep(0.5)
        code = proc.returncode
        if code != 0:
            log = shard_log
            break
        if on_progress:
            on_progress(stage, shard, 1.0)
    ok = code == 0 and contract.read_stage_manifests(stage.args) is not None
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


def execute(run: AlignmentRun, root: str, logs: Path, on_start: Callable[[PlannedStage, int], None] | None = None,
            on_progress: ProgressFn | None = None, on_finish: Callable[[StageRun], None] | None = None,
            processes: int | None = None) -> Plan:
    """Drive the run to DONE or FAILED; returns the final plan. `processes`: training processes (`local_launch`)."""
    graph = stage_graph(run.spec, root)
    env = stage_env(run)
    failures: dict[str, StageResult] = {}
    while True:
        results = {**failures, **finished_results(graph)}
        plan = plan_next_stage(run.spec, root, results)
        if plan.action is not Action.START:
            return plan
        # Locally stages run one at a time, in plan order.
        todo = plan.start[0]
        if on_start:
            on_start(todo.stage, todo.attempt)
        result = run_stage_process(local_launch(todo.stage, processes), todo.attempt, env, logs, on_progress)
        if on_finish:
            on_finish(result)
        if not result.ok:
            prev = failures.get(todo.stage.key)
            failures[todo.stage.key] = StageResult(
                StageState.FAILED, failures=(prev.failures if prev else 0) + 1,
                permanent=result.exit_code == EXIT_BAD_INPUT,
                reason=last_error_line(result.log) or f"exit code {result.exit_code}")
