"""How long a run has left, from the measured rates of its finished stages. Pure: no clock, no I/O.

A stage's time is modelled as
    executor gap + in-worker overhead of its kind + its work / the rate of its kind,
each part measured on the run's own finished stages:
- executor gap: the stage's duration as the executor saw it (first Job created -> manifest found, or the local
  process's life) minus the worker's own wall time; pod scheduling, image pull, process start. One gap for every
  stage, the mean over the finished ones (so a few seconds of timestamp resolution average out).
- in-worker overhead: the worker's wall time minus its work time (loading models, reading inputs); per kind, the mean.
- work / rate: generate's tokens at its tokens/s, judge's tokens scored at its tokens/s, train's pairs (each epoch
  counted) at its pairs/s; the rate is the sum of work over the sum of work seconds of the kind's finished stages.
  A stage not yet run takes the latest finished stage's work per prompt, scaled by its own iteration's prompts (the
  planner's slice); train, once its iteration's judge has finished, scales by the pairs that judge really kept.
- evaluate, validate and seed-train do the same work every time: their mean wall time.
The estimate is None ("unknown") until a stage of every kind still to run has finished. Stages that may run at the
same time (evaluate beside the next iteration on a cluster) overlap: the remaining time is then the longest chain of
dependent stages, not the sum. A running stage has what its heartbeat says is left of it (its fraction done), so the
estimate changes when a stage or a heartbeat does, not with the clock: a status carrying it is not rewritten every
reconcile. The percent done is the stages' time done over their time done and left (summed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean

from spa_workers import contract
from spa_workers.contract import Ledger

PENDING, RUNNING, DONE = "pending", "running", "done"
# Each scaled kind's unit of work (a ledger key) and the planner-known size it scales with (prompts).
WORK_UNIT = {contract.GENERATE: Ledger.TOKENS_GENERATED, contract.JUDGE: Ledger.TOKENS_SCORED,
             contract.TRAIN: Ledger.PAIRS_TRAINED}


@dataclass(frozen=True)
class StageClock:
    """One stage of a run's plan, as far as the estimate needs it."""

    key: str
    kind: str  # validate | seed-train | generate | judge | train | evaluate
    iteration: int
    depends_on: tuple[str, ...] = ()
    prompts: int = 0  # prompts its iteration takes (the planner's slice); 0 for iteration 0's stages
    state: str = PENDING
    seconds: float | None = None  # DONE: its duration as the executor saw it (None: not seen); RUNNING: so far
    wall_s: float | None = None  # DONE: the worker's wall time (the slowest shard's)
    work_s: float | None = None  # DONE: the worker's seconds on the items it counts (the slowest shard's)
    ledger: Mapping[str, float] = field(default_factory=dict)  # DONE: what it counted
    fraction: float | None = None  # RUNNING: the fraction done its heartbeat reported (None: `seconds` tells)


@dataclass(frozen=True)
class Estimate:
    remaining_s: float | None  # None: unknown
    percent: int  # 0..100 of the run done
    unknown_kinds: tuple[str, ...] = ()  # kinds still to run that no finished stage has measured yet


def _rates(done: Sequence[StageClock]) -> dict[str, tuple[float, float]]:
    """kind -> (work per second, in-worker overhead seconds) for the scaled kinds with measured work."""
    out = {}
    for kind, unit in WORK_UNIT.items():
        measured = [s for s in done if s.kind == kind and s.work_s and s.ledger.get(unit)]
        if not measured:
            continue
        rate = sum(s.ledger[unit] for s in measured) / sum(s.work_s for s in measured)  # type: ignore[misc]
        overhead = fmean(max((s.wall_s or s.work_s) - s.work_s, 0.0) for s in measured)  # type: ignore[operator]
        out[kind] = (rate, overhead)
    return out


def _latest(done: Sequence[StageClock], kind: str, before: int | None = None) -> StageClock | None:
    found = [s for s in done if s.kind == kind and (before is None or s.iteration <= before)]
    return max(found, key=lambda s: s.iteration) if found else None


def _work(stage: StageClock, done: Sequence[StageClock], by_key: Mapping[str, StageClock]) -> float | None:
    """The work units a scaled stage will do."""
    unit = WORK_UNIT[stage.kind]
    if stage.kind == contract.TRAIN:
        judge = next((by_key[d] for d in stage.depends_on if d in by_key and by_key[d].kind == contract.JUDGE
                      and by_key[d].state == DONE), None)
        last = _latest(done, contract.TRAIN)
        last_judge = next((s for s in done if s.kind == contract.JUDGE and last and s.iteration == last.iteration),
                          None)
        if judge and last and last_judge and last_judge.ledger.get(Ledger.PAIRS_JUDGED):
            epochs = last.ledger.get(unit, 0.0) / last_judge.ledger[Ledger.PAIRS_JUDGED]
            return judge.ledger.get(Ledger.PAIRS_JUDGED, 0.0) * epochs
    last = _latest(done, stage.kind)
    if last is None or not last.prompts:
        return None
    return last.ledger.get(unit, 0.0) / last.prompts * stage.prompts


def predicted_seconds(stage: StageClock, done: Sequence[StageClock], by_key: Mapping[str, StageClock],
                      gap: float, rates: Mapping[str, tuple[float, float]]) -> float | None:
    """The whole duration a stage should take, executor gap included; None if its kind has not been measured."""
    if stage.kind in WORK_UNIT:
        work = _work(stage, done, by_key)
        if stage.kind not in rates or work is None:
            return None
        rate, overhead = rates[stage.kind]
        return gap + overhead + work / rate
    same = [s.wall_s if s.wall_s is not None else max((s.seconds or 0.0) - gap, 0.0) for s in done
            if s.kind == stage.kind]
    return gap + fmean(same) if same else None


def estimate(stages: Sequence[StageClock], parallel: bool) -> Estimate:
    """The run's remaining seconds and percent done. `stages`: the whole plan; `parallel`: stages whose inputs are
    ready run at the same time (a cluster), else one after another."""
    if not stages:
        return Estimate(0.0, 100)
    done = [s for s in stages if s.state == DONE]
    by_key = {s.key: s for s in stages}
    gaps = [s.seconds - s.wall_s for s in done if s.wall_s is not None and s.seconds is not None]
    gap = max(fmean(gaps), 0.0) if gaps else 0.0
    rates = _rates(done)
    left: dict[str, float] = {}
    spent = sum(s.seconds if s.seconds is not None else s.wall_s or 0.0 for s in done)
    unknown: set[str] = set()
    for s in stages:
        if s.state == DONE:
            continue
        whole = predicted_seconds(s, done, by_key, gap, rates)
        if whole is None:
            unknown.add(s.kind)
            continue
        if s.state == RUNNING:
            so_far = whole * min(max(s.fraction, 0.0), 1.0) if s.fraction is not None else min(s.seconds or 0.0,
                                                                                                 whole)
            spent += so_far
            whole -= so_far
        left[s.key] = whole
    if unknown:
        return Estimate(None, _percent_by_stages(stages), tuple(sorted(unknown)))
    if len(done) == len(stages):
        return Estimate(0.0, 100)
    remaining = _critical_path(stages, left) if parallel else sum(left.values())
    total = spent + sum(left.values())
    percent = int(100 * spent / total) if total > 0 else 0
    return Estimate(round(remaining, 1), min(percent, 99))  # 100 only once every stage is done


def _critical_path(stages: Sequence[StageClock], left: Mapping[str, float]) -> float:
    """The latest finish among the stages left, each starting when the stages it depends on have finished (stages
    are in a valid execution order, as the planner gives them)."""
    finish: dict[str, float] = {}
    for s in stages:
        if s.key not in left:
            continue
        start = max((finish.get(d, 0.0) for d in s.depends_on), default=0.0)
        finish[s.key] = start + left[s.key]
    return max(finish.values(), default=0.0)


def _percent_by_stages(stages: Sequence[StageClock]) -> int:
    """Without measured rates: the share of the plan's stages done (running ones not counted)."""
    return int(100 * sum(1 for s in stages if s.state == DONE) / len(stages))


def human(seconds: float | None) -> str:
    """"unknown", "45s", "12m", "3h05m", "2d04h": what a printer column shows."""
    if seconds is None:
        return "unknown"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
