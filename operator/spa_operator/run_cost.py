"""A run's cost and ETA as its readers show them: the operator's status (from its stage records) and `spa run`'s
console (from stage manifests and the durations it saw). Pure: each reader hands over what it read.

Status fields (the names of Kubeflow Trainer's TrainJob progress where they fit):
- `cost`: {"total": the run's ledger, summed over its stages; "estimated": the totals that include estimates};
- `progressPercentage`: 0..100, the stages' time done over their time done and left; by stages done while the ETA
  is unknown; 100 once it succeeded;
- `estimatedRemainingSeconds`: absent while unknown (as TrainJob leaves it empty);
- `estimatedRemaining`: the same for people and the printer column: "unknown", "45s", "12m", "3h05m".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spa_workers import contract
from spa_workers.contract import GenerateArgs, StageManifest

from spa_operator import eta, ledger
from spa_operator.planner import PlannedStage
from spa_operator.timestamps import parse_iso

SUCCEEDED, RUNNING = "Succeeded", "Running"  # status.stages[].state (status.py's names)
ETA_FIELDS = ("progressPercentage", "estimatedRemainingSeconds", "estimatedRemaining")


def iteration_prompts(graph: Sequence[PlannedStage]) -> dict[int, int]:
    """Prompts each iteration takes (its generate stage's slice of data.prompts)."""
    return {s.iteration: s.args.slice_end - s.args.slice_start for s in graph if isinstance(s.args, GenerateArgs)}


def _clock(stage: PlannedStage, prompts: Mapping[int, int], **kwargs: Any) -> eta.StageClock:
    return eta.StageClock(key=stage.key, kind=stage.stage, iteration=stage.iteration, depends_on=stage.depends_on,
                          prompts=prompts.get(stage.iteration, 0), **kwargs)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def clocks_from_records(graph: Sequence[PlannedStage], records: Mapping[str, Mapping[str, Any]],
                        current: tuple[str, float] | None = None) -> list[eta.StageClock]:
    """The plan's stages from the run's status records; `current`: the stage status.progress is about, and that
    fraction (other running stages count as just started: no clock, so the status changes only with events)."""
    prompts = iteration_prompts(graph)
    out = []
    for s in graph:
        rec = records.get(s.key) or {}
        start, end = parse_iso(rec.get("startTime")), parse_iso(rec.get("endTime"))
        if rec.get("failures"):  # its startTime is its first attempt's: its time tells nothing of a stage's
            start = None
        if rec.get("state") == SUCCEEDED:
            metrics = rec.get("metrics") or {}
            out.append(_clock(s, prompts, state=eta.DONE,
                              seconds=end - start if start is not None and end is not None else None,
                              wall_s=_number(metrics.get("wall_s")),
                              work_s=_number(rec.get(ledger.RECORD_WORK_SECONDS)),
                              ledger=ledger.of_record(rec).amounts))
        elif rec.get("state") == RUNNING:
            fraction = current[1] if current is not None and current[0] == s.key else 0.0
            out.append(_clock(s, prompts, state=eta.RUNNING, fraction=fraction))
        else:  # not started, or failed (to be retried)
            out.append(_clock(s, prompts))
    return out


def current_of(graph: Sequence[PlannedStage], status: Mapping[str, Any]) -> tuple[str, float] | None:
    """(stage key, fraction done) of the stage status.iteration/stage/progress name."""
    progress = status.get("progress")
    key = next((s.key for s in graph if s.iteration == status.get("iteration") and s.stage == status.get("stage")),
               None)
    return (key, float(progress)) if key is not None and isinstance(progress, int | float) else None


def status_fields(graph: Sequence[PlannedStage], records: Sequence[Mapping[str, Any]],
                  current: tuple[str, float] | None = None, succeeded: bool = False,
                  failed: bool = False) -> dict[str, Any]:
    """status.cost and the ETA fields for a run's new status (a failed run keeps its cost, and has no ETA).
    `current`: (stage key, fraction done) of status.stage and status.progress."""
    out: dict[str, Any] = {}
    cost = ledger.status_cost(records)
    if cost is not None:
        out["cost"] = cost
    if failed:
        return out
    if succeeded:
        return {**out, "progressPercentage": 100, "estimatedRemainingSeconds": 0, "estimatedRemaining": "0s"}
    by_key = {r["name"]: r for r in records if isinstance(r.get("name"), str)}
    est = eta.estimate(clocks_from_records(graph, by_key, current), parallel=True)
    out["progressPercentage"] = est.percent
    if est.remaining_s is not None:
        out["estimatedRemainingSeconds"] = round(est.remaining_s)
    out["estimatedRemaining"] = eta.human(est.remaining_s)
    return out


# ------------------------------------------------------------------------------------------ spa run (local)


def clocks_from_manifests(graph: Sequence[PlannedStage], manifests: Mapping[str, Sequence[StageManifest]],
                          seconds: Mapping[str, float], running: tuple[str, float] | None = None
                          ) -> list[eta.StageClock]:
    """The plan's stages from the manifests found (`manifests`: key -> every shard's), the durations this process
    saw (`seconds`: key -> its duration) and the running stage (key, seconds so far). Locally a stage's shards run one
    after another: its wall and work times are their sums."""
    prompts = iteration_prompts(graph)
    out = []
    for s in graph:
        found = manifests.get(s.key)
        if found:
            work = [m.timings[contract.WORK_SECONDS] for m in found if contract.WORK_SECONDS in m.timings]
            out.append(_clock(s, prompts, state=eta.DONE, seconds=seconds.get(s.key),
                              wall_s=sum(m.timings.get("wall_s", 0.0) for m in found),
                              work_s=sum(work) if work else None, ledger=ledger.of_manifests(found).amounts))
        elif running is not None and running[0] == s.key:
            out.append(_clock(s, prompts, state=eta.RUNNING, seconds=running[1]))
        else:
            out.append(_clock(s, prompts))
    return out
