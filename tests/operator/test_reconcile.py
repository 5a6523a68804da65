"""The operator's decision core, table-driven: observations in, actions and the complete new status out.

No cluster, no clock: each case builds an `Observed` (a run, its status as the API server has it, its Jobs and pods,
manifests found in storage) and checks the `Decision`. The stage list comes from `stage_graph`, never hard-coded.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from spa_operator import reconcile as R
from spa_operator import status
from spa_operator.planner import stage_graph
from spa_operator.spec import parse_run
from spa_operator.tenancy import Allowed
from spa_workers.contract import StageManifest

UID = "0c6f2a9e-1111-2222-3333-444455556666"
NOW = 1_800_000_000.0
ROOT = "s3://b/runs/ns/r/0c6f2a9e"


def spec(**over: Any) -> Any:
    doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r", "namespace": "ns"},
           "spec": {"model": {"sft": "s3://m/sft"}, "data": {"seed": "s3://d/s.jsonl", "prompts": "s3://d/p.jsonl"},
                    "iterations": {"count": 1, "promptsPerIteration": 8}, "storage": {"uri": "s3://b/runs"},
                    "maxRetriesPerStage": 1, **over}}
    return parse_run(doc).spec


SPEC = spec()
GRAPH = stage_graph(SPEC, ROOT)
FIRST, SECOND = GRAPH[0], GRAPH[1]  # validate, then seed-train
FIRST_JOB = f"r-i00-{FIRST.stage}-a1"


def job(stage: Any, attempt: int, state: str = "active", **kw: Any) -> R.JobView:
    name = f"r-i{stage.iteration:02d}-{stage.stage}-a{attempt}"
    return R.JobView(name, stage.key, attempt, state, owner_uid=kw.pop("owner_uid", UID),
                     created=kw.pop("created", NOW - 5), **kw)


def record(stage: Any, attempt: int, state: str = R.RUNNING, failures: int = 0, **kw: Any) -> dict[str, Any]:
    return {"name": stage.key, "iteration": stage.iteration, "stage": stage.stage, "state": state,
            "job": f"r-i{stage.iteration:02d}-{stage.stage}-a{attempt}", "attempts": attempt, "failures": failures,
            "startTime": R.iso(NOW - 100), **kw}


def manifest(**metrics: float) -> list[StageManifest]:
    return [StageManifest(stage="x", files={}, metrics=dict(metrics), timings={"wall_s": 3.0})]


def observed(stages: list[dict[str, Any]] | None = None, jobs: tuple[R.JobView, ...] = (), **kw: Any) -> R.Observed:
    status = kw.pop("status", {"phase": R.RUNNING if stages else R.PENDING, "stages": stages or []})
    seen = kw.pop("seen_jobs", frozenset(j.name for j in jobs))
    return R.Observed("ns", "r", UID, 1, status, NOW, graph=kw.pop("graph", GRAPH), spec=kw.pop("spec", SPEC),
                      root=ROOT, jobs=jobs, seen_jobs=seen, **kw)


def stage_rec(d: R.Decision, key: str) -> dict[str, Any]:
    return next(r for r in d.status["stages"] if r["name"] == key)


def cond(d: R.Decision, ctype: str) -> dict[str, Any]:
    return next(c for c in d.status["conditions"] if c["type"] == ctype)


# Failure 1: a Job that succeeds without its manifest is a failed attempt, counted like any other, so retries end.
# (stage records, Jobs, manifests found) -> (action: created attempt or run phase, failures recorded)
SUCCEEDED_WITHOUT_MANIFEST = [
    ("first attempt, no manifest: retried", [record(FIRST, 1)], (job(FIRST, 1, "succeeded"),), {FIRST.key: None},
     ("create", 2), 1),
    ("second attempt too: the run fails", [record(FIRST, 2, failures=1)],
     (job(FIRST, 1, "succeeded"), job(FIRST, 2, "succeeded")), {FIRST.key: None}, ("phase", R.FAILED), 2),
    ("first attempt's Job gone (TTL), second without manifest: fails", [record(FIRST, 2, failures=1)],
     (job(FIRST, 2, "succeeded"),), {FIRST.key: None}, ("phase", R.FAILED), 2),
    ("record says failed, the next Job not yet listed: not counted twice",
     [record(FIRST, 1, R.FAILED, failures=1, reason="x")], (job(FIRST, 1, "succeeded"),), {FIRST.key: None},
     ("create", 2), 1),
    ("manifest found: succeeded", [record(FIRST, 1)], (job(FIRST, 1, "succeeded"),), {FIRST.key: manifest(loss=0.5)},
     ("create", 1), 0),
    ("storage not read: wait, no verdict", [record(FIRST, 1)], (job(FIRST, 1, "succeeded"),), {}, ("phase", R.RUNNING),
     0),
]


@pytest.mark.parametrize("case", SUCCEEDED_WITHOUT_MANIFEST, ids=[c[0] for c in SUCCEEDED_WITHOUT_MANIFEST])
def test_succeeded_job_without_manifest_counts_as_failure(case):
    _, stages, jobs, manifests, (kind, want), failures = case
    d = R.decide(observed(stages, jobs, manifests=manifests))
    if kind == "create":
        assert [(c.stage.key, c.attempt) for c in d.create] == [
            (FIRST.key if want == 2 else SECOND.key, want)], d.status["message"]
    else:
        assert d.status["phase"] == want and not d.create
    assert stage_rec(d, FIRST.key)["failures"] == failures


def test_retry_count_is_bounded_whatever_the_jobs_say():
    """However many Jobs of a stage exist, the run fails once they exceed maxRetriesPerStage: no unbounded loop."""
    jobs = tuple(job(FIRST, a, "succeeded") for a in range(1, 6))
    d = R.decide(observed([record(FIRST, 5)], jobs, manifests={FIRST.key: None}))
    assert d.status["phase"] == R.FAILED and not d.create
    assert "failed 5 times" in d.status["message"]


def test_jobs_of_another_owner_are_not_this_runs():
    """Failure 2: a Job with this run's labels but another owner (a deleted run of the same name) is ignored."""
    d = R.decide(observed([record(FIRST, 1)], (job(FIRST, 1, "succeeded", owner_uid="other"),),
                          index_complete=True, manifests={}))
    assert stage_rec(d, FIRST.key)["failures"] == 1  # its own Job is gone: a failed attempt, retried
    assert [(c.stage.key, c.attempt) for c in d.create] == [(FIRST.key, 2)]


@pytest.mark.parametrize("problem,field,reason", [
    ({"storage_problem": "storage client: ValueError: Invalid endpoint"}, "StorageReachable", "StorageUnreachable"),
    ({"secret_problem": "Secret creds not found"}, "Progressing", "SecretUnavailable"),
    ({"create_blocked": "creating Job x is forbidden (API error 403: Forbidden)"}, "Progressing",
     "JobCreationBlocked"),
])
def test_blocked_runs_get_a_status_and_a_condition(problem, field, reason):
    """Failures 3 and 4: storage a client cannot even be made for, a missing Secret, a 403 on create: the run gets
    a status with a condition naming it, and nothing is created."""
    d = R.decide(observed(**problem))
    assert not d.create
    assert d.status["phase"] == R.PENDING and cond(d, field)["reason"] == reason
    assert cond(d, field)["status"] == "False"
    assert next(iter(problem.values())) in d.status["message"] + cond(d, field)["message"]


def test_refused_create_fails_the_run_naming_the_reason():
    d = R.decide(observed(create_refused={FIRST.key: f"Job {FIRST_JOB}: API error 422: Invalid"}))
    assert d.status["phase"] == R.FAILED and "422" in d.status["message"]
    assert stage_rec(d, FIRST.key)["state"] == R.FAILED


POD = R.PodView(f"{FIRST_JOB}-0", FIRST_JOB, FIRST.key, 1, True, "ImagePullBackOff", NOW - 50)
PENDING_CASES = [
    # (name, pods, job state, spec, settings, want message part, want Progressing reason, timed out)
    ("image pull", (POD,), "active", SPEC, R.Settings(), "pod waiting: ImagePullBackOff", "PodsPending", False),
    ("unschedulable", (dataclasses.replace(POD, waiting="Unschedulable"),), "active", SPEC, R.Settings(),
     "pod waiting: Unschedulable", "PodsPending", False),
    ("past the pending timeout", (POD,), "active", SPEC, R.Settings(pending_timeout_s=30), "", "", True),
    ("within the pending timeout", (POD,), "active", SPEC, R.Settings(pending_timeout_s=60), "ImagePullBackOff",
     "PodsPending", False),
    ("queued by Kueue: no timeout unless asked", (), "suspended", spec(queueName="q"),
     R.Settings(pending_timeout_s=1), "queued", "Queued", False),
    ("queued past the queued timeout", (), "suspended", spec(queueName="q"), R.Settings(queued_timeout_s=30), "", "",
     True),
    ("running pod: no reason", (dataclasses.replace(POD, waiting=""),), "active", SPEC,
     R.Settings(pending_timeout_s=1), f"running {FIRST.key}", "StagesRunning", False),
    ("no pod at all (refused by Pod Security admission)", (), "active", SPEC, R.Settings(),
     "no pod created", "PodsPending", False),
    ("no pod past the pending timeout", (), "active", SPEC, R.Settings(pending_timeout_s=60), "", "", True),
]


@pytest.mark.parametrize("case", PENDING_CASES, ids=[c[0] for c in PENDING_CASES])
def test_pending_pods_show_their_reason_and_time_out(case):
    """Failure 5: a pod that never starts shows why in status.message and the Progressing condition at once; past
    the configured timeout its attempt fails with that reason and its Job is deleted (Kueue-queued: "queued")."""
    _, pods, state, run_spec, settings, message, reason, timed_out = case
    d = R.decide(observed([record(FIRST, 1)], (job(FIRST, 1, state, created=NOW - 100),), pods=pods,
                          spec=run_spec, settings=settings))
    if timed_out:
        assert d.delete_jobs == (FIRST_JOB,)
        assert stage_rec(d, FIRST.key)["failures"] == 1
        assert any(e.reason == "StageFailed" and "pending timeout" in e.message for e in d.events), d.events
        if pods:
            assert not d.create  # the next attempt waits until the pods of this one are gone
    else:
        assert message in d.status["message"] and cond(d, "Progressing")["reason"] == reason
        assert not d.delete_jobs
        due = settings.queued_timeout_s if reason == "Queued" else settings.pending_timeout_s
        if reason in ("PodsPending", "Queued"):
            assert (d.requeue_s is not None) == (due is not None)  # looked at again when the timeout is due


def test_next_attempt_waits_for_orphaned_pods_and_deletes_them():
    """Failure 10: a Job deleted without a propagation policy leaves its pods running; the retry must not write to
    the same prefix while they do: the orphans are deleted and the next attempt waits."""
    orphan = dataclasses.replace(POD, waiting="")
    stages = [record(FIRST, 1)]
    d = R.decide(observed(stages, (), pods=(orphan,), seen_jobs=frozenset({FIRST_JOB})))
    assert not d.create and d.delete_pods == (orphan.name,)
    assert "earlier attempt" in d.status["message"]
    gone = R.decide(observed(stages, (), pods=(dataclasses.replace(orphan, live=False),),
                             seen_jobs=frozenset({FIRST_JOB})))
    assert [(c.stage.key, c.attempt) for c in gone.create] == [(FIRST.key, 2)]


def test_failed_run_lists_no_running_stage_and_stops_its_jobs():
    """Failure 9: when a run fails, no stage record still says Running, and Jobs still running are deleted."""
    with_heldout = spec(data={"seed": "s3://d/s.jsonl", "prompts": "s3://d/p.jsonl", "heldout": "s3://d/h.jsonl"})
    graph = stage_graph(with_heldout, ROOT)
    by_key = {s.key: s for s in graph}
    validate, first = by_key["iter-00/validate"], by_key["iter-00/seed-train"]
    evaluate, generate = by_key["iter-00/evaluate"], by_key["iter-01/generate"]
    stages = [record(validate, 1, R.SUCCEEDED), record(first, 1, R.SUCCEEDED), record(evaluate, 2, failures=1),
              record(generate, 1)]
    jobs = (job(evaluate, 1, "failed"), job(evaluate, 2, "failed"), job(generate, 1, "active"))
    d = R.decide(observed(stages, jobs, graph=graph, spec=with_heldout, manifests={}))
    assert d.status["phase"] == R.FAILED
    assert all(r["state"] != R.RUNNING for r in d.status["stages"]), d.status["stages"]
    assert "r-i01-generate-a1" in d.delete_jobs


def test_status_is_computed_not_remembered():
    """Failure 9: a status someone else edited is repaired; a heartbeat above 1 is clamped (the CRD's maximum)."""
    stages = [record(FIRST, 1)]
    edited = {"phase": "Succeeded-ish", "stages": stages, "message": "hacked", "progress": 7}
    d = R.decide(observed(stages, (job(FIRST, 1),), status=edited, progress=(FIRST.key, 1.7)))
    assert d.status["phase"] == R.RUNNING and d.status["message"] == f"running {FIRST.key}"
    assert d.status["progress"] == 1.0
    assert status.merge_patch(edited, d.status)["phase"] == R.RUNNING


def test_finished_runs_export_their_metrics_from_status():
    """Failure 8: a finished run's phase series comes from its status, so a restarted operator exports it again."""
    status = {"phase": R.FAILED, "conditions": [{"type": "Failed", "status": "True", "reason": "StageFailed"}],
              "stages": [record(FIRST, 1, R.SUCCEEDED, metrics={"loss": 0.4})]}
    d = R.decide(observed(status=status))
    assert d.metrics is not None and d.metrics.phase == R.FAILED
    assert d.metrics.quality == {("0", "loss"): 0.4}
    assert not d.create and not d.events


def test_events_follow_status_transitions():
    """One Event per transition, derived from the old and new status (no memory): a stage started after another
    succeeded is one StageStarted Event naming both; nothing new, no Event."""
    d = R.decide(observed([record(FIRST, 1)], (job(FIRST, 1, "succeeded"),), manifests={FIRST.key: manifest()}))
    assert [(e.reason, e.message) for e in d.events] == [
        ("StageStarted", f"{SECOND.key} attempt 1: Job r-i00-{SECOND.stage}-a1 (after {FIRST.key} succeeded)")]
    again = R.decide(dataclasses.replace(observed([record(FIRST, 1)], (job(FIRST, 1),)),
                                         status={"phase": R.RUNNING, "stages": [record(FIRST, 1)],
                                                 **{k: v for k, v in d.status.items() if k != "stages"}}))
    assert again.events == ()


def test_gate_reason_and_final_model_reach_the_status():
    """A DONE plan's final model goes to status.outputs.model and its reason to the Ready condition's message."""
    stages = [record(s, 1, R.SUCCEEDED) for s in GRAPH]
    d = R.decide(observed(stages))
    assert d.status["phase"] == R.SUCCEEDED and d.status["outputs"]["model"].endswith("/model")
    assert cond(d, "Ready")["status"] == "True"
    # the run's PUBLISHED.json says what status.outputs says; written once, before the status says Succeeded
    uri, text = d.publish
    assert uri.endswith("/PUBLISHED.json") and json.loads(text) == d.status["outputs"]
    assert set(d.status["outputs"]) == {"model", "iteration", "reason", "stoppedByGate"}


def test_worker_images_outside_the_allow_list_fail_the_run():
    """A platform team's allow-list (Helm value workerImages.allowed): a run naming another image fails at once,
    naming the field; the operator's own default image is always allowed."""
    settings = R.Settings(allowed=Allowed(images=("registry.example.com/spa/",)))
    bad = R.decide(observed(spec=spec(image="evil.example.com/miner:1"), settings=settings))
    assert bad.status["phase"] == R.FAILED and "spec.image" in bad.status["message"] and not bad.create
    ok = R.decide(observed(spec=spec(image="registry.example.com/spa/worker:1"), settings=settings))
    assert ok.create and ok.status["phase"] != R.FAILED
    assert R.decide(observed(settings=settings)).create


KUEUE = {"queueName": "q"}
WL = "job-r-i00-validate-a1-1a2b3"


def workload(active: bool = True, paused: bool = False, job_name: str = FIRST_JOB) -> R.WorkloadView:
    return R.WorkloadView(WL, job_name, active, paused)


# spec.suspend: without Kueue the running Job is suspended itself; with queueName Kueue owns the Job's suspend field
# (it unsuspends an admitted Job), so the Job's Workload is deactivated instead and reactivated on resume.
# (spec fields, old phase, Job state, Workloads, workload problem) ->
#     (phase, suspend_jobs, resume_jobs, deactivate_workloads, activate_workloads, message part)
SUSPEND = [
    ("plain: suspend pauses the running Job", {"suspend": True}, R.RUNNING, "active", (), None,
     (R.SUSPENDED, (FIRST_JOB,), (), (), (), "suspended")),
    ("plain: Job already suspended: nothing to patch", {"suspend": True}, R.SUSPENDED, "suspended", (), None,
     (R.SUSPENDED, (), (), (), (), "suspended")),
    ("plain: resume", {}, R.SUSPENDED, "suspended", (), None, (R.RUNNING, (), (FIRST_JOB,), (), (), "")),
    ("Kueue: suspend deactivates the running Job's Workload, not the Job", {**KUEUE, "suspend": True}, R.RUNNING,
     "active", (workload(),), None, (R.SUSPENDED, (), (), (WL,), (), "suspended")),
    ("Kueue: Workload already paused, Job evicted: nothing to patch", {**KUEUE, "suspend": True}, R.SUSPENDED,
     "suspended", (workload(False, True),), None, (R.SUSPENDED, (), (), (), (), "suspended")),
    ("Kueue: a Workload of another Job is left alone", {**KUEUE, "suspend": True}, R.RUNNING, "active",
     (workload(job_name="other-job"),), None, (R.SUSPENDED, (), (), (), (), "suspended")),
    ("Kueue: Workloads unreadable (no CRD, no RBAC): the status says so", {**KUEUE, "suspend": True}, R.RUNNING,
     "active", (), "API error 403: Forbidden", (R.SUSPENDED, (), (), (), (), "cannot be paused: API error 403")),
    ("Kueue: resume reactivates what the run paused; Suspended until it is active", KUEUE, R.SUSPENDED,
     "suspended", (workload(False, True),), None, (R.SUSPENDED, (), (), (), (WL,), "resuming")),
    ("Kueue: resumed, Workload active again: Running (queued until Kueue admits)", KUEUE, R.SUSPENDED,
     "suspended", (workload(True),), None, (R.RUNNING, (), (), (), (), "queued")),
    ("Kueue: a Workload Kueue deactivated itself (requeue limit) is not reactivated", KUEUE, R.SUSPENDED,
     "suspended", (workload(False, False),), None, (R.RUNNING, (), (), (), (), "queued")),
]


@pytest.mark.parametrize("name,fields,old_phase,state,workloads,problem,want", SUSPEND, ids=[c[0] for c in SUSPEND])
def test_suspend_with_and_without_kueue(name, fields, old_phase, state, workloads, problem, want):
    d = R.decide(observed([record(FIRST, 1)], (job(FIRST, 1, state),), spec=spec(**fields),
                          status={"phase": old_phase, "stages": [record(FIRST, 1)]}, workloads=workloads,
                          workload_problem=problem))
    phase, suspend, resume, deactivate, activate, message = want
    assert (d.status["phase"], d.suspend_jobs, d.resume_jobs, d.deactivate_workloads, d.activate_workloads) == \
        (phase, suspend, resume, deactivate, activate)
    assert message in d.status["message"] and not d.create and not d.delete_jobs
    if activate:
        assert d.requeue_s is not None and d.requeue_s <= R.RESUME_CHECK_S  # nothing else wakes the run


def test_suspended_kueue_run_does_not_time_out_its_evicted_job():
    """A paused run's Job, evicted by Kueue (suspended), waits for the resume, not for the queued timeout."""
    old = job(FIRST, 1, "suspended", created=NOW - 3600)
    settings = R.Settings(queued_timeout_s=60)
    paused = R.decide(observed([record(FIRST, 1)], (old,), spec=spec(**KUEUE, suspend=True), settings=settings,
                               workloads=(workload(False, True),)))
    assert paused.status["phase"] == R.SUSPENDED and not paused.delete_jobs
    assert stage_rec(paused, FIRST.key)["state"] == R.RUNNING
    running = R.decide(observed([record(FIRST, 1)], (old,), spec=spec(**KUEUE), settings=settings))
    assert running.delete_jobs == (FIRST_JOB,)  # not paused: the timeout applies
    # Resumed after a long pause: queued since Kueue evicted the Job (its Suspended condition), not since created.
    evicted = dataclasses.replace(old, suspended_since=NOW - 10)
    resumed = R.decide(observed([record(FIRST, 1)], (evicted,), spec=spec(**KUEUE), settings=settings))
    assert not resumed.delete_jobs and cond(resumed, "Progressing")["reason"] == "Queued"


def test_workloads_are_read_only_around_a_kueue_suspend():
    """The kopf layer lists Workloads only for a run with queueName that is suspended or resuming."""
    assert R.workloads_needed(spec(**KUEUE, suspend=True), {"phase": R.RUNNING})
    assert R.workloads_needed(spec(**KUEUE), {"phase": R.SUSPENDED})
    assert not R.workloads_needed(spec(**KUEUE), {"phase": R.RUNNING})
    assert not R.workloads_needed(spec(suspend=True), {"phase": R.SUSPENDED})
