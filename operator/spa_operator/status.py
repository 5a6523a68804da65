"""A run's status as the decision core writes it: phases, conditions, the message, the current position, the Events
of each transition between two statuses, and the metric values a status implies. Pure: `reconcile.decide` calls
these with what it observed and decided.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from spa_workers import contract
from spa_workers.contract import ManifestKeys as K

from spa_operator.jobs import failed_by_bad_input
from spa_operator.planner import PlannedStage

if TYPE_CHECKING:
    from spa_operator.core_types import Observed

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)
QUALITY_KEYS = (K.PAIRS, K.REWARD_GAP, K.REFINED_FRACTION, K.LOSS, K.REWARD_ACCURACY, K.HELDOUT_AGREEMENT,
                K.WIN_RATE, K.WIN_RATE_SE, K.LC_WIN_RATE, K.LC_WIN_RATE_SE, K.JUDGE_FAILED,
                K.HELDOUT_AGREEMENT_SE, K.EVAL_ANSWER_TOKENS, K.SFT_ANSWER_TOKENS, K.ANSWER_TOKENS)
CONDITION_ORDER = ("Ready", "Progressing", "Failed", "Suspended", "StorageReachable")
QUEUED = "queued"  # the waiting reason of a Job Kueue has not admitted yet
# An active Job without any pod this long after its creation: the pod was refused (Pod Security admission, quota).
NO_POD = "NoPodCreated"
GANG_INCOMPLETE = "gang incomplete"  # a multi-node stage with some of its pods unschedulable


def gang_incomplete(placed: int, size: int, reason: str) -> str:
    """The waiting reason of a gang whose pods are not all placed: "gang incomplete: 1/2 pods scheduled (...)"."""
    return f"{GANG_INCOMPLETE}: {placed}/{size} pods scheduled ({reason})"


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class MetricValues:
    phase: str
    iteration: int | None
    progress: float | None
    running: Mapping[tuple[str, str], float]  # (iteration, stage) -> start time of each running stage
    quality: Mapping[tuple[str, str], float]  # (iteration, metric key) -> value, for succeeded stages
    outcomes: Sequence[tuple[str, str]] = ()  # (stage, outcome) of attempts that finished in this decision
    durations: Sequence[tuple[str, float]] = ()  # (stage, seconds) of stages that succeeded in this decision


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: Any) -> float | None:
    """Unix seconds of an RFC 3339 UTC timestamp (fromisoformat: strptime cost a third of a millisecond per Job
    event)."""
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    try:
        return dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def terminal(status: Mapping[str, Any]) -> bool:
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed"), {})
    return status.get("phase") == SUCCEEDED or (status.get("phase") == FAILED and failed.get("reason") != "InvalidSpec")


def status_message(running: list[str], waiting: Mapping[str, tuple[str, float]], orphans: list[str],
                   blocked: str | None, reason: str) -> str:
    parts = []
    if orphans:
        parts.append(f"waiting for pods of an earlier attempt of {', '.join(orphans)} to stop")
    if blocked:
        parts.append(f"waiting: {blocked}")
    if waiting:
        parts.append("; ".join(f"{k}: {w[0]}" if w[0] == QUEUED else
                               f"{k}: no pod created (refused by admission or quota? see the Job's Events)"
                               if w[0] == NO_POD else f"{k}: {w[0]}" if w[0].startswith(GANG_INCOMPLETE)
                               else f"{k}: pod waiting: {w[0]}" for k, w in waiting.items()))
    rest = [k for k in running if k not in waiting]
    if rest:
        parts.append(f"running {', '.join(rest)}")
    return "; ".join(parts) if parts else ("" if reason == "waiting for running stages" else reason)


def position(obs: Observed, status: dict[str, Any], records: Mapping[str, Mapping[str, Any]], done: bool) -> None:
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
    if obs.progress is not None and obs.progress[0] == current.key:
        progress = obs.progress[1]
    if (records.get(current.key) or {}).get("state") == SUCCEEDED:
        progress = 1.0
    status["progress"] = round(min(max(progress, 0.0), 1.0), 3)  # a heartbeat above 1 must not void the patch


def conditions(obs: Observed, status: Mapping[str, Any], waiting: Mapping[str, tuple[str, float]],
               blocked: str | None, reason: str, failed: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    phase = status.get("phase", PENDING)
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
            why = "JobCreationBlocked"
        elif only_waiting:
            why = "Queued" if all(w[0] == QUEUED for w in waiting.values()) else "PodsPending"
        else:
            why = "StagesRunning" if phase == RUNNING else phase
        progressing = phase in (RUNNING, PENDING) and not blocked and not only_waiting
        put("Progressing", progressing, why, status.get("message", "") if not blocked or why == "JobCreationBlocked"
            else blocked)
        put("StorageReachable", obs.storage_problem is None,
            "StorageUnreachable" if obs.storage_problem else "Reachable", obs.storage_problem or "")
    suspended = bool(obs.spec is not None and obs.spec.suspend) and not failed
    put("Suspended", suspended, "Suspended" if suspended else "NotSuspended", "")
    return [conds[t] for t in CONDITION_ORDER if t in conds]


def transitions(obs: Observed, old: Mapping[str, Any], new: Mapping[str, Any], by_key: Mapping[str, PlannedStage]
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
    if phase != FAILED:
        reachable_before = next((c.get("status") for c in old.get("conditions") or []
                                 if c.get("type") == "StorageReachable"), "True") == "True"
        if reachable_before and obs.storage_problem:
            events.append(Event("Warning", "StorageUnreachable", obs.storage_problem))
        elif not reachable_before and not obs.storage_problem:
            events.append(Event("Normal", "StorageReachable", "storage answers again"))
    return tuple(events), tuple(outcomes), tuple(durations)


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
    return MetricValues(phase, iteration if isinstance(iteration, int) else None,
                        float(progress) if isinstance(progress, int | float) else None, running, quality)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from old to new at the top level of status (lists and nested dicts are replaced)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
