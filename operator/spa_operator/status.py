"""A run's status, rendered from what the decision concluded (`core_types.Outcome`) in one pass: phase, stage
records, position, message, conditions, the Events of the transition from the observed status, and the metric values
the new status implies. Pure: `reconcile.decide` decides first, then calls `render` once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from spa_workers import contract
from spa_workers.contract import ManifestKeys as K

from spa_operator import run_cost
from spa_operator.core_types import (
    FAILED,
    GANG_INCOMPLETE,
    NO_POD,
    PENDING,
    PHASES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Event,
    MetricValues,
    Observed,
    Outcome,
)
from spa_operator.jobs import failed_by_bad_input
from spa_operator.planner import PlannedStage
from spa_operator.timestamps import iso, parse_iso

__all__ = ["FAILED", "PENDING", "PHASES", "RUNNING", "SUCCEEDED", "SUSPENDED", "Rendered", "iso", "merge_patch",
           "metric_values", "parse_iso", "redacted", "render", "terminal"]

QUALITY_KEYS = (K.PAIRS, K.REWARD_GAP, K.REFINED_FRACTION, K.LOSS, K.REWARD_ACCURACY, K.HELDOUT_AGREEMENT,
                K.WIN_RATE, K.WIN_RATE_SE, K.LC_WIN_RATE, K.LC_WIN_RATE_SE, K.JUDGE_FAILED,
                K.HELDOUT_AGREEMENT_SE, K.EVAL_ANSWER_TOKENS, K.SFT_ANSWER_TOKENS, K.ANSWER_TOKENS)
CONDITION_ORDER = ("Ready", "Progressing", "Failed", "Suspended", "StorageReachable")
# Progressing reasons of a run whose Jobs the API server refused (kubeapi.forbidden_kind tells them apart): each
# change of refusal is a Warning Event with the refusal's own message.
DENIED = ("Forbidden", "QuotaExceeded", "AdmissionDenied")
# Fields a failed run's status keeps from the observed one.
KEPT_WHEN_FAILED = ("startTime", "storagePrefix", "iteration", "stage", "progress", "completionTime")


class Rendered(NamedTuple):
    status: dict[str, Any]
    events: tuple[Event, ...]
    metrics: MetricValues


def render(obs: Observed, outcome: Outcome) -> Rendered:
    """The run's complete new status from the decision's outcome, with the Events and metric values of the change."""
    old = obs.status
    if outcome.keep:
        status = dict(old)
        if obs.generation is not None:
            status["observedGeneration"] = obs.generation
        return Rendered(status, (), metric_values(status))
    by_key = {s.key: s for s in obs.graph}
    records = outcome.records or {}
    if outcome.failure is not None:
        status = {k: v for k, v in old.items() if k in KEPT_WHEN_FAILED}
        if outcome.records:
            status["stages"] = [dict(records[s.key]) for s in obs.graph if s.key in records]
        elif "stages" in old:
            status["stages"] = old["stages"]
        reason, message = outcome.failure[0], outcome.failure[1][:1000]
        status.update(phase=FAILED, message=message, observedGeneration=obs.generation)
        status.update(run_cost.status_fields(obs.graph, status.get("stages") or [], failed=True))
        status["completionTime"] = old.get("completionTime") or iso(obs.now)
        status["conditions"] = _conditions(obs, status, outcome, failed=(reason, message))
    else:
        status = {k: v for k, v in old.items() if k in ("startTime",)}
        status.update(storagePrefix=obs.root, observedGeneration=obs.generation, phase=outcome.phase)
        done = outcome.phase == SUCCEEDED
        if done:
            status["outputs"] = dict(outcome.outputs or {"model": outcome.final_model})
            status["progress"] = 1.0
            status["completionTime"] = old.get("completionTime") or iso(obs.now)
        status["stages"] = [dict(records[s.key]) for s in obs.graph if s.key in records]
        _position(obs, status, records, done)
        status["message"] = _message(outcome, records, by_key)
        if outcome.phase in (RUNNING, SUSPENDED) and "startTime" not in status and records:
            status["startTime"] = iso(obs.now)
        status.update(run_cost.status_fields(obs.graph, status["stages"], run_cost.current_of(obs.graph, status),
                                             succeeded=done))
        status["conditions"] = _conditions(obs, status, outcome)
    events, outcomes, durations = _transitions(obs, old, status, by_key)
    return Rendered(status, events, dataclasses.replace(metric_values(status), outcomes=outcomes, durations=durations))


# ---------------------------------------------------------------------------------------------- reading a status


def terminal(status: Mapping[str, Any]) -> bool:
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
    return status.get("phase") == SUCCEEDED or (status.get("phase") == FAILED and failed.get("reason") != "InvalidSpec")


def _message(outcome: Outcome, records: Mapping[str, Mapping[str, Any]], by_key: Mapping[str, PlannedStage]) -> str:
    if outcome.phase == SUCCEEDED:
        return f"final model: {outcome.final_model}" + (f" ({outcome.reason})" if outcome.reason else "")
    if outcome.note is not None:
        return outcome.note
    parts = []
    if outcome.orphans:
        parts.append(f"waiting for pods of an earlier attempt of {', '.join(outcome.orphans)} to stop")
    if outcome.blocked:
        parts.append(f"waiting: {outcome.blocked}")
    waiting = outcome.waiting
    if waiting:
        parts.append("; ".join(f"{k}: {w[0]}" if w[0] == QUEUED else
                               f"{k}: no pod created (refused by admission or quota? see the Job's Events)"
                               if w[0] == NO_POD else f"{k}: {w[0]}" if w[0].startswith(GANG_INCOMPLETE)
                               else f"{k}: pod waiting: {w[0]}" for k, w in waiting.items()))
    rest = [k for k in by_key if (records.get(k) or {}).get("state") == RUNNING and k not in waiting]
    if rest:
        parts.append(f"running {', '.join(rest)}")
    reason = outcome.reason
    return "; ".join(parts) if parts else ("" if reason == "waiting for running stages" else reason)


def _position(obs: Observed, status: dict[str, Any], records: Mapping[str, Mapping[str, Any]], done: bool) -> None:
    """status.iteration/stage/progress: the latest running stage (else the latest started); the last when done."""
    old = obs.status
    if done:
        last = obs.graph[-1] if obs.graph else None
        if last is not None:
            status["iteration"], status["stage"] = last.iteration, last.stage
        return
    running = [s for s in obs.graph if (records.get(s.key) or {}).get("state") == RUNNING]
    started = [s for s in obs.graph if s.key in records]
    current = (running or started or [None])[-1]
    if current is None:
        return
    status["iteration"], status["stage"] = current.iteration, current.stage
    same = old.get("iteration") == current.iteration and old.get("stage") == current.stage
    progress = float(old.get("progress", 0.0) or 0.0) if same else 0.0
    if obs.progress is not None and obs.progress[0] == current.key and math.isfinite(obs.progress[1]):
        progress = obs.progress[1]  # a NaN heartbeat must not reach the status: the API server refuses it
    if (records.get(current.key) or {}).get("state") == SUCCEEDED:
        progress = 1.0
    status["progress"] = round(min(max(progress, 0.0), 1.0), 3)  # a heartbeat above 1 must not void the patch


def _conditions(obs: Observed, status: Mapping[str, Any], outcome: Outcome,
                failed: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    phase = status.get("phase", PENDING)
    waiting, blocked, reason = outcome.waiting, outcome.blocked, outcome.reason
    prev = {c.get("type"): c for c in obs.status.get("conditions") or [] if isinstance(c, Mapping)}
    conds: dict[str, dict[str, Any]] = {}

    def put(ctype: str, ok: bool, why: str, message: str = "") -> None:
        state = "True" if ok else "False"
        before = prev.get(ctype) or {}
        cond = {"type": ctype, "status": state, "reason": why, "message": message[:1000]}
        if obs.generation is not None:
            cond["observedGeneration"] = obs.generation
        cond["lastTransitionTime"] = (before["lastTransitionTime"] if before.get("status") == state
                                      and before.get("lastTransitionTime") else iso(obs.now))
        conds[ctype] = cond

    if failed:
        put("Failed", True, failed[0], failed[1])
        put("Ready", False, "Failed", failed[1])
        put("Progressing", False, "Failed", "")
    else:
        put("Failed", False, "NotFailed", "")
        done = phase == SUCCEEDED
        ready_msg = (status.get("outputs") or {}).get("model", "") + (f" ({reason})" if done and reason else "")
        put("Ready", done, "Succeeded" if done else phase, ready_msg if done else "")
        only_waiting = bool(waiting) and len(waiting) == len([r for r in status.get("stages", [])
                                                               if r.get("state") == RUNNING])
        if obs.storage_problem:
            why = "StorageUnreachable"
        elif obs.secret_problem:
            why = "SecretUnavailable"
        elif blocked:
            why = obs.create_blocked_reason
        elif only_waiting:
            why = "Queued" if all(w[0] == QUEUED for w in waiting.values()) else "PodsPending"
        else:
            why = "StagesRunning" if phase == RUNNING else phase
        progressing = phase in (RUNNING, PENDING) and not blocked and not only_waiting
        put("Progressing", progressing, why, status.get("message", "")
            if not blocked or why == obs.create_blocked_reason else blocked)
        put("StorageReachable", obs.storage_problem is None,
            "StorageUnreachable" if obs.storage_problem else "Reachable", obs.storage_problem or "")
    suspended = bool(obs.spec is not None and obs.spec.suspend) and not failed
    put("Suspended", suspended, "Suspended" if suspended else "NotSuspended", "")
    return [conds[t] for t in CONDITION_ORDER if t in conds]


def _transitions(obs: Observed, old: Mapping[str, Any], new: Mapping[str, Any], by_key: Mapping[str, PlannedStage]
                 ) -> tuple[tuple[Event, ...], tuple[tuple[str, str], ...], tuple[tuple[str, float], ...]]:
    """Events and counter increments for what changed between the observed status and the new one."""
    before = {r.get("name"): r for r in old.get("stages") or [] if isinstance(r, Mapping)}
    events: list[Event] = []
    outcomes: list[tuple[str, str]] = []
    durations: list[tuple[str, float]] = []
    succeeded, started = [], []
    for rec in new.get("stages") or []:
        key, prev = rec.get("name"), before.get(rec.get("name")) or {}
        stage = by_key.get(key)
        if stage is None:
            continue
        state, attempts = rec.get("state"), rec.get("attempts", 0)
        if state == SUCCEEDED and prev.get("state") != SUCCEEDED:
            succeeded.append(key)
            outcomes.append((stage.stage, "succeeded"))
            t0 = parse_iso(rec.get("startTime"))
            if t0 is not None:
                durations.append((stage.stage, max(obs.now - t0, 0.0)))
        elif int(rec.get("failures", 0) or 0) > int(prev.get("failures", 0) or 0):  # failed (and maybe restarted)
            reason = rec.get("reason", "")
            permanent = reason.startswith("Job rejected") or failed_by_bad_input(
                {"reason": reason.split(":", 1)[0], "message": reason})
            outcomes.append((stage.stage, "bad-input" if permanent else "failed"))
            attempt = attempts - 1 if state == RUNNING else attempts
            events.append(Event("Warning", "StageFailed", f"{key} attempt {attempt}: {rec.get('reason', '')}"))
        if state == RUNNING and (prev.get("state") != RUNNING or prev.get("attempts") != attempts):
            started.append(f"{key} attempt {attempts}: Job {rec.get('job', '')}")
    after = f" (after {', '.join(succeeded)} succeeded)" if succeeded else ""
    events += [Event("Normal", "StageStarted", s + after) for s in started]
    if succeeded and not started and new.get("phase") != SUCCEEDED:
        events.append(Event("Normal", "StageSucceeded", f"{', '.join(succeeded)} succeeded"))
    phase, was = new.get("phase"), old.get("phase")
    if phase != was:
        if phase == SUCCEEDED:
            events.append(Event("Normal", "RunSucceeded", new.get("message", "")))
        elif phase == FAILED:
            failed = next((c for c in new.get("conditions", []) if c["type"] == "Failed"), {})
            events.append(Event("Warning", failed.get("reason", "Failed"), new.get("message", "")))
        elif phase == SUSPENDED:
            events.append(Event("Normal", "Suspended", "no new stage starts; running Jobs are suspended"))
        elif was == SUSPENDED:
            events.append(Event("Normal", "Resumed", "the run goes on"))
    progressing = _condition(new, "Progressing")
    if progressing.get("reason") in DENIED and obs.create_blocked:
        before = _condition(old, "Progressing")
        if (before.get("reason"), before.get("message")) != (progressing.get("reason"), progressing.get("message")):
            events.append(Event("Warning", str(progressing["reason"]), obs.create_blocked))
    if phase != FAILED:
        reachable_before = next((c.get("status") for c in old.get("conditions") or []
                                 if c.get("type") == "StorageReachable"), "True") == "True"
        if reachable_before and obs.storage_problem:
            events.append(Event("Warning", "StorageUnreachable", obs.storage_problem))
        elif not reachable_before and not obs.storage_problem:
            events.append(Event("Normal", "StorageReachable", "storage answers again"))
    return tuple(events), tuple(outcomes), tuple(durations)


def _condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") == ctype), {})


def metric_values(status: Mapping[str, Any]) -> MetricValues:
    """The run's gauges, from its status alone: a restarted operator exports finished runs again."""
    phase = status.get("phase") or PENDING
    running: dict[tuple[str, str], float] = {}
    quality: dict[tuple[str, str], float] = {}
    for rec in status.get("stages") or []:
        if not isinstance(rec, Mapping):
            continue
        it = str(rec.get("iteration", ""))
        if rec.get("state") == RUNNING and phase in (RUNNING, SUSPENDED):
            started = parse_iso(rec.get("startTime"))
            if started:
                running[(it, str(rec.get("stage", "")))] = started
        if rec.get("state") == SUCCEEDED:
            for key, value in (rec.get("metrics") or {}).items():
                if key in QUALITY_KEYS and not (key == K.PAIRS and rec.get("stage") == contract.SEED_TRAIN):
                    quality[(it, key)] = float(value)
    iteration = status.get("iteration")
    progress = status.get("progress")
    total = (status.get("cost") or {}).get("total") or {}
    return MetricValues(phase, iteration if isinstance(iteration, int) else None,
                        float(progress) if isinstance(progress, int | float) else None, running, quality,
                        cost={k: float(v) for k, v in total.items() if isinstance(v, int | float)},
                        remaining_s=_num(status.get("estimatedRemainingSeconds")),
                        percent=_num(status.get("progressPercentage")))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def redacted(value: Any, secrets: Sequence[str]) -> Any:
    """`value` (a status, a patch, an Event message) with each secret value replaced by *** inside its strings, and
    only there: numbers, keys and the document's shape stay as they are (a Secret holding "9000" must not turn
    "responses": 19000 into something that is no longer JSON). Longer secrets first, so none is left half shown."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in sorted(secrets, key=len, reverse=True):
            value = value.replace(secret, "***")
        return value
    if isinstance(value, Mapping):
        return {k: redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(v, secrets) for v in value]
    return value


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from old to new at the top level of status (lists and nested dicts are replaced)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
