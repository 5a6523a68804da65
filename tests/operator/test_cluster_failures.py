"""The real-cluster failures of issue 10, each once end to end: the real operator against the emulated cluster.

Most use the harness's instant mode (Jobs complete at once, no process) with a stand-in RunStore, so each takes a
few seconds; the pod-level ones (pending pods, orphaned pods) run the stub worker.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from cluster import WORKLOADS, Harness, Kueue, pod_base_env
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_workers.contract import StageManifest
from test_faults import FAKE, S3_KEYS, condition, finish, stages

pytestmark = pytest.mark.asyncio


class Store:
    """A RunStore in which every stage has finished (done=True) or none ever does."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def manifests(self, args: Any) -> list[StageManifest] | None:
        return [StageManifest(stage="x", files={})] if self.done else None

    def progress(self, args: Any) -> float | None:
        return None

    def write_text(self, uri: str, text: str) -> None:  # the finished run's PUBLISHED.json
        self.written = (uri, text)


def run_doc(name: str, **spec: Any) -> dict[str, Any]:
    return tiny_run(name, FAKE, "bucket", "http://127.0.0.1:9", iterations=spec.pop("iterations", 0),
                    heldout=False, **spec)


async def test_job_succeeding_without_manifest_is_retried_a_bounded_number_of_times(cluster):
    """Failure 1: a Job that succeeds but leaves no manifest (workers writing to pod-local disk) was never counted,
    so the stage was retried forever. Now it is a failed attempt: maxRetriesPerStage 1 -> two Jobs, run Failed."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=False))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("nomanifest"))
        assert await finish(cluster, "nomanifest", timeout=30) == "Failed"
        await asyncio.sleep(1.0)  # nothing more is created afterwards
        await op.stop()
    assert cluster.all_jobs_ever() == ["nomanifest-i00-validate-a1", "nomanifest-i00-validate-a2"]
    run = cluster.run("nomanifest")
    assert "failed 2 times" in run["status"]["message"] and "wrote no manifest" in run["status"]["message"]


async def test_job_of_another_owner_is_not_taken_for_the_runs_own(cluster):
    """Failure 2: a Job with the run's Job name owned by someone else (a deleted run's, not yet collected) made the
    new run wait forever on the stranger's Job. Now the run says so; and `team.a` and `team-a` no longer share Job
    names."""
    stranger = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "clash-i00-validate-a1", "namespace": "ns",
                             "ownerReferences": [{"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
                                                  "name": "clash", "uid": "an-older-run", "controller": True}]},
                "spec": {"suspend": True, "template": {"spec": {"containers": []}}}}
    status, _ = await cluster.request("POST", "/apis/batch/v1/namespaces/ns/jobs", stranger)
    assert status in (200, 201)
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("clash"))
        await wait_for(lambda: "another owner" in ((cluster.run("clash") or {}).get("status") or {}).get(
            "message", ""), 20, "the clash reported")
        assert condition(cluster, "clash", "Progressing")["reason"] == "JobCreationBlocked"
        assert phase(cluster, "clash") != "Running" or not stages(cluster, "clash")
        await cluster.create_run(run_doc("team.a"))
        await cluster.create_run(run_doc("team-a"))
        assert await finish(cluster, "team.a", timeout=30) == "Succeeded"
        assert await finish(cluster, "team-a", timeout=30) == "Succeeded"
        await op.stop()
    jobs = {n for n in cluster.jobs() if n.startswith("team")}
    assert len(jobs) == 4, jobs  # validate and seed-train of each run, none shared


async def test_storage_client_refusing_the_spec_gets_a_status(cluster):
    """Failure 3: boto3 refusing an endpoint or region raised before any status write (status == {} forever). Now it
    is the StorageReachable condition, with the reason."""

    def refuse(run: Any, secret: Any) -> Any:
        raise ValueError("Invalid endpoint: http://x y")

    op = OperatorRunner(cluster.url, ["ns"], store_factory=refuse)
    await op.start()
    await cluster.create_run(run_doc("badclient"))
    await wait_for(lambda: condition(cluster, "badclient", "StorageReachable").get("status") == "False", 20,
                   "StorageReachable=False")
    await op.stop()
    cond = condition(cluster, "badclient", "StorageReachable")
    assert "Invalid endpoint" in cond["message"] and phase(cluster, "badclient") == "Pending"


async def test_forbidden_job_creation_is_reported_then_recovers(cluster):
    """Failure 4: with OwnerReferencesPermissionEnforcement the 403 was retried silently (Pending, empty message).
    Now the status names the missing permission; once granted (the chart's RBAC does), the run goes on."""
    cluster.emulator.enforce_owner_refs = True
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("forbidden"))
        await wait_for(lambda: "forbidden" in ((cluster.run("forbidden") or {}).get("status") or {}).get(
            "message", ""), 20, "the 403 reported")
        assert "alignmentruns/finalizers" in cluster.run("forbidden")["status"]["message"]
        assert condition(cluster, "forbidden", "Progressing")["status"] == "False"
        cluster.emulator.finalizers_granted = True
        assert await finish(cluster, "forbidden", timeout=30) == "Succeeded"
        await op.stop()


async def test_pending_pod_shows_its_reason_and_times_out(cluster, s3_env):
    """Failure 5: a pod stuck in ImagePullBackOff looked Running until the stage deadline. Now its reason is in the
    status at once, a status edited by someone else is repaired (failure 9), and past the pending timeout the
    attempt fails and the next one runs."""
    def fault(job: dict[str, Any], index: int, pod_attempt: int) -> str | None:
        return "pending:ImagePullBackOff" if job["metadata"]["name"].endswith("-a1") else None

    op = OperatorRunner(cluster.url, ["ns"], pending_timeout_s=4.0)
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=0.2, fault=fault):
        await op.start()
        await cluster.create_run(tiny_run("stuck", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=0,
                                          heldout=False))
        await wait_for(lambda: "ImagePullBackOff" in ((cluster.run("stuck") or {}).get("status") or {}).get(
            "message", ""), 20, "the waiting reason in status.message")
        assert condition(cluster, "stuck", "Progressing")["reason"] == "PodsPending"
        await cluster.request("PATCH", "/apis/spa.dev/v1alpha1/namespaces/ns/alignmentruns/stuck/status",
                              {"status": {"message": "all good", "progress": 0.9}}, "application/merge-patch+json")
        await wait_for(lambda: "ImagePullBackOff" in cluster.run("stuck")["status"]["message"], 10, "a repair")
        assert await finish(cluster, "stuck", timeout=60) == "Succeeded"
        await op.stop()
    seed = stages(cluster, "stuck")["iter-00/validate"]
    assert (seed["attempts"], seed["failures"]) == (2, 1)
    failed = [e["message"] for e in cluster.events() if e["reason"] == "StageFailed"]
    assert any("ImagePullBackOff" in m and "pending timeout" in m for m in failed), failed


async def test_finished_run_is_exported_again_after_a_restart(cluster):
    """Failure 8: a finished run's metrics were never exported by a restarted operator, so SpaRunFailed resolved
    itself."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=False))
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(run_doc("gone", maxRetriesPerStage=0))
        assert await finish(cluster, "gone", timeout=30) == "Failed"
        await op.stop()
        ctl = await op.start()
        series = ctl.metrics.phase.labels("ns", "gone", "Failed")
        await wait_for(lambda: series._value.get() == 1.0, 10, "spa_run_phase{phase=Failed} after the restart")
        await op.stop()


async def test_orphaned_pods_stop_before_the_next_attempt(cluster, s3_env):
    """Failure 10: a Job deleted without a propagation policy (the API's default for Jobs) leaves its pod running,
    and the retry wrote to the same prefix alongside it. Now the operator deletes the orphan and starts the next
    attempt only once it has stopped: the orphan's deletion wakes the run (the slow timer cannot be what moves it)."""
    op = OperatorRunner(cluster.url, ["ns"], timer_s=60.0)
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=6.0) as harness:
        await op.start()
        await cluster.create_run(tiny_run("orphan", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=0,
                                          heldout=False))
        await wait_for(lambda: "orphan-i00-validate-a1-0-1" in harness._pod_procs, 30, "the first pod to run")
        status, _ = await cluster.request("DELETE", "/apis/batch/v1/namespaces/ns/jobs/orphan-i00-validate-a1")
        assert status == 200 and cluster.emulator.deletions["orphan-i00-validate-a1"] == ""  # orphans its pod
        assert await finish(cluster, "orphan", timeout=60) == "Succeeded"
        await op.stop()
    assert harness.ended["orphan-i00-validate-a1-0-1"] <= harness.created["orphan-i00-validate-a2"]
    assert harness.created["orphan-i00-validate-a2"] - harness.ended["orphan-i00-validate-a1-0-1"] < 3.0
    assert (stages(cluster, "orphan")["iter-00/validate"]["attempts"]) == 2


def _other_workload(name: str) -> list[tuple[str, dict[str, Any]]]:
    """A Job and a pod of something else in the run's namespace (no spa.dev/run-uid label): (path, body) each."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"suspend": True, "template": {"metadata": {}, "spec": {"containers": []}}}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-pod", "namespace": "ns"},
           "spec": {"containers": []}, "status": {"phase": "Running"}}
    return [("/apis/batch/v1/namespaces/ns/jobs", job), ("/api/v1/namespaces/ns/pods", pod)]


async def test_jobs_and_pods_of_other_workloads_never_reach_the_operator(cluster):
    """Item 11: Jobs and pods were watched with the run-uid filter applied by kopf on receipt, so every Job and pod
    of the watched namespaces (the cluster, by default) streamed to the operator. Now the API server filters them
    (labelSelector on list and on watch): other workloads' objects, there before the operator started or created
    after, are never sent to it; the run's own are."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True, instant_pods=True):
        for path, body in _other_workload("other-before"):
            assert (await cluster.request("POST", path, body))[0] in (200, 201)
        await op.start()
        for path, body in _other_workload("other-after"):
            assert (await cluster.request("POST", path, body))[0] in (200, 201)
        await cluster.create_run(run_doc("selected"))
        assert await finish(cluster, "selected", timeout=30) == "Succeeded"
        await op.stop()
    reads = {(plural, verb, selector) for agent, plural, verb, selector in cluster.emulator.reads
             if agent.startswith("spa-operator") and plural in ("jobs", "pods")}
    assert reads == {(plural, verb, "spa.dev/run-uid") for plural in ("jobs", "pods") for verb in ("list", "watch")}
    served = {(plural, name) for agent, plural, _, name in cluster.emulator.served
              if agent.startswith("spa-operator")}
    assert ("jobs", "selected-i00-validate-a1") in served and ("pods", "selected-i00-validate-a1-0-1") in served
    assert [s for s in served if s[1].startswith("other")] == []


def _workload_of(cluster: Any, job: str) -> dict[str, Any]:
    return next((obj.raw for (res, _, _), obj in list(cluster.emulator.objects.items())
                 if res == WORKLOADS and not obj.deleted
                 and any(o["name"] == job for o in obj.raw["metadata"].get("ownerReferences", []))), {})


async def test_suspend_with_kueue_pauses_the_running_job_through_its_workload(cluster):
    """Item 11: with queueName, spec.suspend left running Jobs running (Kueue owns their suspend field and unsuspends
    admitted Jobs) although the field's description said it pauses them. Now the Job's Kueue Workload is
    deactivated (Kueue evicts the Job and does not admit it again) and reactivated on resume; the run then finishes,
    with no attempt lost or repeated."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    first = "queued-i00-validate-a1"
    async with Harness(cluster, {}, instant=True, instant_after=lambda: 1.5) as harness, Kueue(cluster):
        await op.start()
        await cluster.create_run(run_doc("queued", queueName="team-q"))
        await wait_for(lambda: first in harness.created, 20, "the first Job admitted and running")
        await cluster.patch_run("queued", {"spec": {"suspend": True}})
        await wait_for(lambda: cluster.jobs()[first]["spec"].get("suspend") is True, 20, "the Job evicted by Kueue")
        workload = _workload_of(cluster, first)
        assert workload["spec"]["active"] is False and "spa.dev/paused-by-run" in workload["metadata"]["annotations"]
        assert phase(cluster, "queued") == "Suspended"
        await asyncio.sleep(2.0)  # longer than the Job takes to run: it stays paused
        assert first not in harness.finished and cluster.jobs()[first]["spec"]["suspend"] is True
        await cluster.patch_run("queued", {"spec": {"suspend": False}})
        assert await finish(cluster, "queued", timeout=30) == "Succeeded"
        await op.stop()
    assert cluster.all_jobs_ever() == ["queued-i00-seed-train-a1", first]
    workload = _workload_of(cluster, first)
    assert workload["spec"]["active"] is True and "spa.dev/paused-by-run" not in workload["metadata"].get(
        "annotations", {})


async def test_a_finished_run_keeps_no_decision_state_and_stays_finished(cluster, caplog):
    """A finished run's reconciler drops what only deciding needs (parsed spec, stage graph, spec copies, views), as
    a run found finished after a restart never holds it: ~8 KiB a run, 1000 finished runs hold none. Its Jobs' later
    events (the garbage collector deleting one) wake it, and it stays as it was: no Job, status write or Event."""
    caplog.set_level(logging.DEBUG, logger="spa_operator")
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    async with Harness(cluster, {}, instant=True, instant_pods=True):
        ctl = await op.start()
        _, run = await cluster.create_run(run_doc("done"))
        assert await finish(cluster, "done", timeout=30) == "Succeeded"
        rs = ctl.runs[run["metadata"]["uid"]]
        await wait_for(lambda: rs.parsed is None, 10, "the finished run's decision state dropped")
        assert (rs.spec, rs.started_spec, rs.observed, rs.seen_jobs) == (None, None, {}, set())
        await asyncio.sleep(0.5)
        reconciles = sum("done: reconciled in" in r.getMessage() for r in caplog.records)
        writes, status, jobs = len(cluster.writes()), cluster.run("done")["status"], sorted(cluster.jobs())
        assert (await cluster.request("DELETE", f"/apis/batch/v1/namespaces/ns/jobs/{jobs[0]}"))[0] == 200
        await wait_for(lambda: sum("done: reconciled in" in r.getMessage() for r in caplog.records) > reconciles,
                       10, "the deletion to wake the finished run")
        await asyncio.sleep(0.5)
        assert cluster.writes()[writes:] == [] and cluster.run("done")["status"] == status
        assert sorted(cluster.jobs()) == jobs[1:] and rs.parsed is None
        await op.stop()
