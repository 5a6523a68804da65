"""The operator's decision core: what was observed -> what to do. Pure: no I/O, no clock, no memory.

`decide` takes everything the kopf layer observed about one run (its spec and current status as the API server has
them, its Jobs and their pods, the stage manifests found in storage, whether storage and the credentials Secret
answered, the wall clock) and returns what to do: Jobs (every object of a stage attempt) to create, Jobs and pods to
delete, the complete new status, the Events to post and the metric values to export. The new status is computed from
the observations every time; the kopf layer patches the difference to the status it observed, so anyone's edit of a
status field is repaired on the next reconcile.

The stage schedule itself comes from `planner.plan_next_stage`; this module turns the cluster into its
`StageResult`s and its answer into actions and an `Outcome` (the run's phase, its stage records, what it waits for).
Deciding comes first; `status.render` then derives the status, its conditions, message and position, the Events of
the transition and the metric values from the outcome, once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys as K
from spa_workers.contract import StageManifest

from spa_operator import ledger
from spa_operator import status as rendering
from spa_operator.core_types import (
    FAILED,
    NO_POD,
    PENDING,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Create,
    Decision,
    JobView,
    Observed,
    Outcome,
    PodView,
    Settings,
    WorkloadView,
    gang_incomplete,
)
from spa_operator.jobs import job_name
from spa_operator.planner import (
    PUBLISHED_FILE,
    Action,
    PlannedStage,
    StageResult,
    StageState,
    plan_next_stage,
    publication,
)
from spa_operator.status import iso, terminal
from spa_operator.tenancy import violation

# The core's face: `decide` and the data it maps (defined in core_types).
__all__ = ["FAILED", "PENDING", "RUNNING", "SUCCEEDED", "SUSPENDED", "Create", "Decision", "JobView", "Observed",
           "PodView", "Settings", "WorkloadView", "decide", "iso", "job_name_of", "manifests_to_read", "running_gangs",
           "terminal", "workloads_needed"]

STAGE_METRICS = (K.PAIRS, K.DROPPED_IDENTICAL, K.DROPPED_EMPTY, K.RESPONSES, K.REWARD_GAP, K.CONFIDENCE, K.LOSS,
                 K.REWARD_ACCURACY, K.REFINED_FRACTION, K.HELDOUT_AGREEMENT, K.TOKENS_PER_S, "wall_s",
                 K.WIN_RATE, K.WIN_RATE_SE, K.LC_WIN_RATE, K.LC_WIN_RATE_SE, K.JUDGE_FAILED,
                 K.HELDOUT_AGREEMENT_SE, K.ANSWER_TOKENS, K.EVAL_ANSWER_TOKENS, K.SFT_ANSWER_TOKENS)
SUMMED = (K.PAIRS, K.DROPPED_IDENTICAL, K.DROPPED_EMPTY, K.RESPONSES)
NO_POD_GRACE_S = 30.0
RESUME_CHECK_S = 2.0  # how soon a resuming run looks again at the Kueue Workloads it reactivated


# --------------------------------------------------------------------------------------------------------- stages


def stage_outputs(stage: PlannedStage) -> dict[str, str]:
    out = {"dir": stage.output}
    if stage.stage in (contract.TRAIN, contract.SEED_TRAIN):
        out["model"] = f"{stage.output.rstrip('/')}/{contract.MODEL_SUBDIR}"
    return out


def compact_metrics(manifests: Sequence[StageManifest]) -> dict[str, float]:
    """The stage's headline numbers over its shards: counts add up, the wall time is the slowest shard's, rates and
    means are the last shard's (compact, not exact). A non-finite figure is left out: the API server refuses a
    status holding one (400), which would freeze the run's status."""
    out: dict[str, float] = {}
    for m in manifests:
        merged = {**m.counts, **m.metrics, "wall_s": m.timings.get("wall_s", 0.0)}
        for k in STAGE_METRICS:
            v = merged.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = out.get(k, 0) + v if k in SUMMED else max(out.get(k, v), v) if k == "wall_s" else v
    return {k: round(float(v), 6) for k, v in out.items()}


def _latest(views: Sequence[JobView]) -> JobView | None:
    return max(views, key=lambda v: v.attempt) if views else None


def manifests_to_read(obs: Observed) -> list[str]:
    """Stage keys whose manifests the decision needs: a finished-looking stage not yet recorded as succeeded."""
    records = _records(obs)
    views = _views_by_stage(obs)
    out = []
    for stage in obs.graph:
        rec = records.get(stage.key) or {}
        if rec.get("state") == SUCCEEDED:
            continue
        latest = _latest(views.get(stage.key, []))
        if latest is not None and latest.attempt >= int(rec.get("attempts", 0) or 0):
            if latest.state == "succeeded":
                out.append(stage.key)
        elif rec.get("state") == RUNNING and _vanished(obs, rec):
            out.append(stage.key)
    return out


def _vanished(obs: Observed, rec: Mapping[str, Any]) -> bool:
    """The record's Job is not in the Job list: deleted (seen before, or the list is complete), or not yet listed."""
    job = rec.get("job", "")
    return job in obs.seen_jobs or obs.index_complete


def _records(obs: Observed) -> dict[str, dict[str, Any]]:
    keys = {s.key for s in obs.graph}
    return {r["name"]: dict(r) for r in obs.status.get("stages") or [] if isinstance(r, Mapping)
            and r.get("name") in keys}


def _views_by_stage(obs: Observed) -> dict[str, list[JobView]]:
    out: dict[str, list[JobView]] = {}
    for v in obs.jobs:
        if v.owner_uid in ("", obs.uid):
            out.setdefault(v.stage_key, []).append(v)
    return out


def _waiting(obs: Observed, job: JobView, queued: bool) -> tuple[str, float] | None:
    """Why the attempt's pods do not run, and since when; None if they run (or none exists yet)."""
    if queued and job.state == "suspended":  # queued since created, or since Kueue evicted it (a paused run)
        return QUEUED, max(job.created, job.suspended_since)
    if job.state == "active" and obs.now - job.created >= NO_POD_GRACE_S and not any(
            p.job == job.name for p in obs.pods):
        return NO_POD, job.created
    waiting = [p for p in obs.pods if p.job == job.name and p.live and p.waiting]
    if not waiting:
        return None
    first = min(waiting, key=lambda p: p.since)
    if job.gang > 1 and not first.scheduled:  # the placed ranks hold their GPUs and wait for the others
        pods = [p for p in obs.pods if p.job == job.name]
        unplaced = sum(1 for p in pods if p.live and not p.scheduled)
        placed = min(sum(1 for p in pods if p.scheduled), job.gang - unplaced)  # (a finished rank was placed)
        return gang_incomplete(placed, job.gang, first.waiting), first.since
    return first.waiting, first.since


@dataclasses.dataclass
class _Stage:
    """One stage's reading: the planner's result and its new status record."""

    result: StageResult | None
    record: dict[str, Any] | None
    waiting: tuple[str, float] | None = None
    timed_out: str | None = None  # a Job to delete: its pods waited past the timeout


def _new_record(stage: PlannedStage, job: str, attempt: int, now: float) -> dict[str, Any]:
    return {"name": stage.key, "iteration": stage.iteration, "stage": stage.stage, "state": RUNNING,
            "job": job, "attempts": attempt, "failures": 0, "startTime": iso(now)}


def _fail_record(rec: dict[str, Any], failures: int, reason: str) -> None:
    rec.update(state=FAILED, failures=failures, reason=reason[:500])
    rec.pop("endTime", None)


def read_stage(obs: Observed, stage: PlannedStage, rec: dict[str, Any] | None, views: list[JobView]) -> _Stage:
    """The planner's view of one stage from its status record, its Jobs, their pods and storage."""
    if rec is not None and rec.get("state") == SUCCEEDED:
        return _Stage(StageResult(StageState.SUCCEEDED, metrics=dict(rec.get("metrics") or {})), rec)
    latest = _latest(views)
    rec_attempts = int(rec.get("attempts", 0) or 0) if rec else 0
    rec_failures = int(rec.get("failures", 0) or 0) if rec else 0
    if latest is None or latest.attempt < rec_attempts:
        if rec is None:
            return _Stage(None, None)
        if rec.get("state") == RUNNING:
            if not _vanished(obs, rec):
                return _Stage(StageResult(StageState.RUNNING), rec)  # just created: its watch event is on the way
            found = obs.manifests.get(stage.key)
            if found:  # finished, then removed (TTL)
                return _succeed(obs, stage, rec, found)
            rec = dict(rec)
            _fail_record(rec, rec_failures + 1, f"Job {rec.get('job', '')} was deleted")
        reason = rec.get("reason", "")
        permanent = reason.startswith("Job rejected")
        return _Stage(StageResult(StageState.FAILED, failures=int(rec.get("failures", 0) or 0), permanent=permanent,
                                  reason=reason), rec)
    rec = dict(rec) if rec is not None else _new_record(stage, latest.name, latest.attempt, obs.now)
    rec["job"], rec["attempts"] = latest.name, max(rec_attempts, latest.attempt)
    # Every attempt before the latest failed (a new attempt starts only after one failed): Jobs of earlier
    # attempts count even where the record missed them, and the record counts those already deleted.
    earlier = sum(1 for v in views if v.attempt < latest.attempt)
    counted_latest = rec.get("state") == FAILED and rec_attempts == latest.attempt
    failures = max(rec_failures - 1 if counted_latest else rec_failures, earlier)
    if latest.deleting:  # stopped by the operator (pending timeout) or by someone else
        reason = rec.get("reason", "") if counted_latest else f"Job {latest.name} was deleted"
        _fail_record(rec, failures + 1, reason)
        return _Stage(StageResult(StageState.FAILED, failures=failures + 1, reason=reason), rec)
    if latest.state in ("active", "suspended"):
        rec["state"], rec["failures"] = RUNNING, failures
        queued = obs.spec is not None and bool(obs.spec.queue_name)
        waiting = _waiting(obs, latest, queued)
        timeout = (obs.settings.queued_timeout_s if waiting and waiting[0] == QUEUED
                   else obs.settings.pending_timeout_s)
        if waiting and timeout is not None and obs.now - waiting[1] >= timeout and not obs.spec.suspend:
            what = "queued" if waiting[0] == QUEUED else f"pod waiting: {waiting[0]}"
            _fail_record(rec, failures + 1, f"{what} for {int(obs.now - waiting[1])}s "
                                            f"(pending timeout {int(timeout)}s)")
            return _Stage(StageResult(StageState.FAILED, failures=failures + 1, reason=rec["reason"]), rec,
                          timed_out=latest.name)
        return _Stage(StageResult(StageState.RUNNING), rec, waiting=waiting)
    if latest.state == "succeeded":
        found = obs.manifests.get(stage.key)
        if found:
            rec["failures"] = failures
            return _succeed(obs, stage, rec, found)
        if stage.key not in obs.manifests:  # not read (storage trouble): cannot tell yet
            return _Stage(StageResult(StageState.RUNNING), rec)
        reason = f"Job {latest.name} succeeded but {stage.key} wrote no manifest"
        _fail_record(rec, failures + 1, reason)
        return _Stage(StageResult(StageState.FAILED, failures=failures + 1, reason=reason), rec)
    reason = latest.reason or "Job failed"
    _fail_record(rec, failures + 1, reason)
    return _Stage(StageResult(StageState.FAILED, failures=failures + 1, permanent=latest.permanent, reason=reason),
                  rec)


def _succeed(obs: Observed, stage: PlannedStage, rec: dict[str, Any], manifests: Sequence[StageManifest]) -> _Stage:
    metrics = compact_metrics(manifests)
    rec.update(state=SUCCEEDED, outputs=stage_outputs(stage), metrics=metrics, **ledger.record_fields(manifests))
    rec.setdefault("endTime", iso(obs.now))
    rec.pop("reason", None)
    return _Stage(StageResult(StageState.SUCCEEDED, failures=int(rec.get("failures", 0) or 0), metrics=metrics),
                  rec)


# ------------------------------------------------------------------------------------------------------- decide


def decide(obs: Observed) -> Decision:
    """What to do about one run, given what was observed: the actions and the outcome, then the status rendered
    from the outcome."""
    old = obs.status
    if terminal(old):
        return _decision(obs, Outcome(str(old.get("phase")), keep=True))
    if obs.spec_violation:
        return _failed(obs, "SpecImmutable", obs.spec_violation, _records(obs))
    if obs.spec_error is not None or obs.spec is None:
        if old.get("phase") == FAILED and old.get("observedGeneration") == obs.generation:
            return _decision(obs, Outcome(FAILED, keep=True))
        return _failed(obs, "InvalidSpec", obs.spec_error or "invalid spec", {})
    spec = obs.spec
    by_key = {s.key: s for s in obs.graph}
    views = _views_by_stage(obs)
    records = _records(obs)
    results: dict[str, StageResult] = {}
    readings: dict[str, _Stage] = {}
    for stage in obs.graph:
        reading = read_stage(obs, stage, records.get(stage.key), views.get(stage.key, []))
        readings[stage.key] = reading
        if reading.result is not None:
            results[stage.key] = reading.result
        if reading.record is not None:
            records[stage.key] = reading.record
    for key, why in obs.create_refused.items():  # the API refused the Job: retrying cannot help
        rec = records.get(key) or _new_record(by_key[key], "", 0, obs.now)
        rec["attempts"] = int(rec.get("attempts", 0) or 0) + 1
        results[key] = StageResult(StageState.FAILED, failures=int(rec.get("failures", 0) or 0) + 1, permanent=True,
                                   reason=f"Job rejected: {why}")
        _fail_record(rec, results[key].failures, results[key].reason)
        records[key] = rec
    delete_jobs = tuple(r.timed_out for r in readings.values() if r.timed_out)
    refused = violation(spec, obs.settings.allowed, obs.settings.worker_service_account)
    if refused is not None:
        return _failed(obs, refused.reason, f"{refused.field}: {refused.message}", records)

    plan = plan_next_stage(spec, obs.root, results, obs.graph or None)
    if plan.action is Action.FAILED:
        return _failed(obs, "StageFailed", plan.reason, records, delete_jobs=delete_jobs,
                       failed_stage=plan.failed_stage)

    create: list[Create] = []
    delete_pods: list[str] = []
    blocked = obs.create_blocked or obs.storage_problem or obs.secret_problem
    orphans = []
    if plan.action is Action.START and not spec.suspend:
        for todo in plan.start:
            # Two attempts of a stage never run at once: pods of an earlier attempt (a Job deleted without
            # propagation leaves them running; a terminating pod may still write) must be gone before the next one
            # starts.
            left = [p for p in obs.pods if p.stage_key == todo.stage.key and p.live and p.attempt < todo.attempt]
            if left:
                orphans.append(todo.stage.key)
                delete_pods += [p.name for p in left if not p.terminating
                                and not any(v.name == p.job for v in obs.jobs)]
                continue
            if blocked:
                continue
            attempt = max(todo.attempt, int((records.get(todo.stage.key) or {}).get("attempts", 0) or 0) + 1)
            create.append(Create(todo.stage, attempt))
            rec = records.get(todo.stage.key)
            job = job_name_of(obs, todo.stage, attempt)
            if rec is None:
                records[todo.stage.key] = _new_record(todo.stage, job, attempt, obs.now)
            else:  # the reason of the last failure stays
                rec.update(state=RUNNING, job=job, attempts=attempt)
                rec.pop("endTime", None)

    running = [k for k in by_key if (records.get(k) or {}).get("state") == RUNNING]
    waiting = {k: r.waiting for k, r in readings.items() if r.waiting and k in running}
    suspend_jobs: tuple[str, ...] = ()
    resume_jobs: tuple[str, ...] = ()
    deactivate: tuple[str, ...] = ()
    activate: tuple[str, ...] = ()
    publish: tuple[str, str] | None = None
    published: dict[str, Any] | None = None
    active_views = [_latest(views.get(k, [])) for k in running]
    live_jobs = {v.name for v in active_views if v is not None and v.state in ("active", "suspended")}
    note = None
    if plan.action is Action.DONE:
        phase = SUCCEEDED
        # the planner's verdict, the same one `spa run` prints and writes into report.json and PUBLISHED.json
        published = publication(plan)
        publish = (storage.join(obs.root, PUBLISHED_FILE), contract.dumps(published, indent=2)) \
            if old.get("phase") != SUCCEEDED else None
    elif spec.suspend:
        phase, note = SUSPENDED, "suspended"
        if spec.queue_name:
            # Kueue owns a queued Job's spec.suspend (it unsuspends the Job again on admission): the Job is paused
            # through its Workload instead; deactivated, Kueue evicts it (suspends the Job) and keeps it unadmitted.
            deactivate = tuple(w.name for w in obs.workloads if w.job in live_jobs and w.active)
            if obs.workload_problem and live_jobs:
                note = f"suspended; running Jobs cannot be paused: {obs.workload_problem}"
        else:
            suspend_jobs = tuple(v.name for v in active_views if v is not None and v.state == "active")
    elif spec.queue_name and any(w.paused and not w.active for w in obs.workloads):
        # Resuming: the run stays Suspended until every Workload it paused is active again (Kueue then queues and
        # admits it), so a failed patch is tried again rather than forgotten.
        phase = SUSPENDED
        activate = tuple(w.name for w in obs.workloads if w.paused and not w.active)
        note = f"resuming: reactivating Kueue Workloads {', '.join(activate)}"
    else:
        phase = RUNNING if records else PENDING
        if old.get("phase") == SUSPENDED and not spec.queue_name:
            resume_jobs = tuple(v.name for v in active_views if v is not None and v.state == "suspended")
    outcome = Outcome(phase, records, final_model=plan.final_model if plan.action is Action.DONE else None,
                      outputs=published,
                      reason=plan.reason, waiting=waiting, orphans=tuple(orphans), blocked=blocked, note=note)
    requeue = _requeue(obs, readings)
    if create:  # its Job's ADDED event wakes no reconcile (nothing new): look for its pod when that is due
        requeue = min(requeue if requeue is not None else NO_POD_GRACE_S + 0.1, NO_POD_GRACE_S + 0.1)
    if activate:  # nothing wakes the run when a Workload changes: look again soon
        requeue = min(requeue if requeue is not None else RESUME_CHECK_S, RESUME_CHECK_S)
    return _decision(obs, outcome, create=tuple(create), delete_jobs=delete_jobs, delete_pods=tuple(delete_pods),
                     suspend_jobs=suspend_jobs, resume_jobs=resume_jobs, deactivate_workloads=deactivate,
                     activate_workloads=activate, requeue_s=requeue,
                     transition=bool(create) and any(v.finished_at for v in obs.jobs), publish=publish)


def _decision(obs: Observed, outcome: Outcome, **actions: Any) -> Decision:
    """The actions decided, with the status (its Events and metric values) rendered from the outcome."""
    status, events, metrics = rendering.render(obs, outcome)
    return Decision(status, events=events, metrics=metrics, **actions)


def workloads_needed(spec: Any, status: Mapping[str, Any]) -> bool:
    """Whether the decision needs the run's Kueue Workloads: a run with queueName that is, or is resuming from,
    suspended (the kopf layer reads them only then)."""
    return bool(spec is not None and spec.queue_name and (spec.suspend or status.get("phase") == SUSPENDED))


def running_gangs(obs: Observed) -> tuple[Create, ...]:
    """The attempts of this run whose multi-node Job runs: creating their objects again (the Job answers 409, its
    Service and pod group are created if missing) repairs what a restart between the creates left out."""
    by_key = {s.key: s for s in obs.graph}
    return tuple(Create(by_key[v.stage_key], v.attempt) for v in obs.jobs
                 if v.gang > 1 and v.state in ("active", "suspended") and v.owner_uid == obs.uid
                 and v.stage_key in by_key and not v.deleting)


def job_name_of(obs: Observed, stage: PlannedStage, attempt: int) -> str:
    return job_name(obs.name, stage.iteration, stage.stage, attempt)


def _failed(obs: Observed, reason: str, message: str, records: dict[str, dict[str, Any]],
            delete_jobs: tuple[str, ...] = (), failed_stage: str | None = None) -> Decision:
    for key, rec in records.items():  # a failed run lists no stage as running
        if rec.get("state") == RUNNING:
            rec.update(state=FAILED, reason="the run failed" if key != failed_stage else rec.get("reason", ""))
    # Jobs still running when the run fails are stopped: their results can no longer be used.
    views = _views_by_stage(obs)
    active = tuple(v.name for vs in views.values() for v in vs if v.state in ("active", "suspended"))
    return _decision(obs, Outcome(FAILED, records or None, failure=(reason, message)),
                     delete_jobs=tuple(dict.fromkeys((*delete_jobs, *active))))


def _requeue(obs: Observed, readings: Mapping[str, _Stage]) -> float | None:
    """When to look again unprompted: a pending timeout to check, or None (the kopf layer's timers apply)."""
    due = []
    for r in readings.values():
        if r.waiting:
            timeout = (obs.settings.queued_timeout_s if r.waiting[0] == QUEUED else obs.settings.pending_timeout_s)
            if timeout is not None:
                due.append(max(r.waiting[1] + timeout - obs.now, 0.0) + 0.1)
    for r in readings.values():  # a Job still without a pod: look again when that becomes a reason
        rec = r.record or {}
        if r.waiting is None and rec.get("state") == RUNNING:
            job = next((v for v in obs.jobs if v.name == rec.get("job") and v.state == "active"), None)
            if job is not None and not any(p.job == job.name for p in obs.pods):
                due.append(max(job.created + NO_POD_GRACE_S - obs.now, 0.0) + 0.1)
    return min(due) if due else None
