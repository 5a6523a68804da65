"""The operator against the emulated cluster under faults: restarts, failing and preempted pods, storage outages,
deletion, invalid specs, secrets.

Where the operator's handling of a fault is under test, the pods run tests/operator/stub_worker.py — the same argv and
stage contract as `spa-worker` (outputs, then the manifest last, heartbeats), without model work — so these tests
take seconds. test_full_run.py runs the real workers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from cluster import Harness, TcpProxy, pod_base_env, start_cluster
from operator_runner import OperatorRunner
from runs import STAGES_2_ITER, phase, tiny_run, wait_for
from test_crd import INVALID

pytestmark = pytest.mark.asyncio
FAKE = {"model": "/models/sft", "seed": "/data/seed.jsonl", "prompts": "/data/prompts.jsonl",
        "heldout": "/data/heldout.jsonl"}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def stage_of(job: dict[str, Any]) -> str:
    return job["metadata"]["annotations"]["spa.dev/stage-key"]


def attempt_of(job: dict[str, Any]) -> int:
    return int(job["metadata"]["labels"]["spa.dev/attempt"])


async def run_with_fault(cluster, s3_env, name: str, fault: Any, stub_seconds: float = 0.2, settle: float = 0.0,
                         **spec: Any) -> tuple[str | None, Harness]:
    """A seed + 1 iteration run (stub pods, `fault` deciding each pod's fate) run to its end; its final phase and
    the harness (for its pod record). `settle`: seconds the operator keeps running after the end."""
    op = OperatorRunner(cluster.url, ["ns"])
    harness = Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=stub_seconds, fault=fault)
    async with harness:
        await op.start()
        await cluster.create_run(tiny_run(name, FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=1,
                                          **spec))
        outcome = await finish(cluster, name)
        await asyncio.sleep(settle)
        await op.stop()
    return outcome, harness


def stages(cluster, name: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in (cluster.run(name) or {}).get("status", {}).get("stages", [])}


def condition(cluster, name: str, ctype: str) -> dict[str, Any]:
    conds = (cluster.run(name) or {}).get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == ctype), {})


async def finish(cluster, name: str, timeout: float = 90) -> str:
    await wait_for(lambda: phase(cluster, name) in ("Succeeded", "Failed"), timeout, f"{name} to finish")
    return phase(cluster, name)


async def test_restart_inside_every_stage_completes_without_duplicate_jobs(cluster, s3_env):
    """Stop the operator while each stage's Job runs (and once while a Job finishes with nobody watching), start a
    new one: the run completes and every stage has exactly one Job."""
    op = OperatorRunner(cluster.url, ["ns"])
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=2.0):
        await op.start()
        await cluster.create_run(tiny_run("restarts", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"]))
        seen: set[str] = set()
        restarts = 0
        while phase(cluster, "restarts") not in ("Succeeded", "Failed"):
            new = set(cluster.jobs()) - seen
            if not new:
                await asyncio.sleep(0.05)
                continue
            seen |= new
            await op.stop()
            if restarts == 3:  # this time the stage finishes while no operator runs
                await wait_for(lambda new=new: all(op_harness_finished(cluster, n) for n in new), 30, "jobs to end")
            await asyncio.sleep(0.2)
            await op.start()
            restarts += 1
        await op.stop()
    assert phase(cluster, "restarts") == "Succeeded"
    assert restarts >= 8
    jobs = cluster.all_jobs_ever()
    assert sorted(stage_of(j) for j in cluster.jobs().values()) == sorted(STAGES_2_ITER)
    assert len(jobs) == len(STAGES_2_ITER), jobs  # one Job per stage: nothing duplicated
    assert all(s["state"] == "Succeeded" and s["attempts"] == 1 for s in stages(cluster, "restarts").values())


def op_harness_finished(cluster, job: str) -> set[str]:
    j = cluster.jobs().get(job, {})
    done = any(c.get("type") in ("Complete", "Failed") for c in j.get("status", {}).get("conditions", []))
    return {job} if done else set()


async def test_stage_failing_once_is_retried_then_succeeds(cluster, s3_env):
    def fault(job, index, pod_attempt):
        return "fail" if stage_of(job) == "iter-01/judge" and attempt_of(job) == 1 else None

    outcome, _ = await run_with_fault(cluster, s3_env, "flaky", fault, heldout=False)
    assert outcome == "Succeeded"
    judge = stages(cluster, "flaky")["iter-01/judge"]
    assert (judge["attempts"], judge["failures"], judge["job"]) == (2, 1, "flaky-i01-judge-a2")
    assert {"flaky-i01-judge-a1", "flaky-i01-judge-a2"} <= set(cluster.jobs())
    reasons = [e["reason"] for e in cluster.events()]
    assert "StageFailed" in reasons and "RunSucceeded" in reasons


async def test_stage_always_failing_fails_the_run_after_max_retries(cluster, s3_env):
    def fault(job, index, pod_attempt):
        return "fail" if stage_of(job) == "iter-01/generate" else None

    outcome, _ = await run_with_fault(cluster, s3_env, "broken", fault, settle=0.5, heldout=False,
                                      maxRetriesPerStage=2)
    assert outcome == "Failed"
    gen_jobs = sorted(n for n, j in cluster.jobs().items() if stage_of(j) == "iter-01/generate")
    assert gen_jobs == [f"broken-i01-generate-a{i}" for i in (1, 2, 3)]  # 1 + maxRetriesPerStage, then no more
    failed = condition(cluster, "broken", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "StageFailed"
    assert "iter-01/generate failed 3 times (maxRetriesPerStage=2)" in failed["message"]
    assert "BackoffLimitExceeded" in failed["message"]
    assert condition(cluster, "broken", "Ready")["status"] == "False"


async def test_bad_input_is_not_retried(cluster, s3_env):
    """Exit code 2 matches the Job's FailJob rule: one attempt, then the run fails."""
    def fault(job, index, pod_attempt):
        return "bad-input" if stage_of(job) == "iter-00/validate" else None

    outcome, _ = await run_with_fault(cluster, s3_env, "badinput", fault, maxRetriesPerStage=3)
    assert outcome == "Failed"
    assert list(cluster.jobs()) == ["badinput-i00-validate-a1"]
    assert "PodFailurePolicy" in condition(cluster, "badinput", "Failed")["message"]


async def test_disruption_is_retried_and_not_counted(cluster, s3_env):
    """A pod preempted with a DisruptionTarget condition gets a replacement pod (the Job's podFailurePolicy Ignore
    rule, as the harness's Job controller applies it); with maxRetriesPerStage=0 any counted failure would fail
    the run."""
    def fault(job, index, pod_attempt):
        return "disrupt" if stage_of(job) == "iter-01/train" and pod_attempt == 1 else None

    outcome, harness = await run_with_fault(cluster, s3_env, "preempted", fault, stub_seconds=1.0, heldout=False,
                                            maxRetriesPerStage=0)
    assert outcome == "Succeeded"
    train = stages(cluster, "preempted")["iter-01/train"]
    assert (train["attempts"], train["failures"]) == (1, 0)
    pods = [(a, code) for job, _, a, code in harness.pods if job == "preempted-i01-train-a1"]
    assert pods == [(1, 137), (2, 0)]


async def test_storage_outage_sets_condition_and_run_recovers(cluster, s3_env):
    """S3 goes away just as a stage finishes: the stage cannot be confirmed (no manifest readable), the run says so
    in the StorageReachable condition and waits; when S3 is back, it goes on to Succeeded."""
    proxy = TcpProxy(int(s3_env["SPA_S3_ENDPOINT"].rsplit(":", 1)[1]))
    await proxy.up()
    outage = asyncio.Event()

    async def before_finish(job):
        if stage_of(job) == "iter-01/generate" and not outage.is_set():
            outage.set()
            await proxy.down()

    op = OperatorRunner(cluster.url, ["ns"])
    harness = Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=0.2, )
    harness.before_finish = before_finish
    async with harness:
        await op.start()
        await cluster.create_run(tiny_run("outage", FAKE, s3_env["BUCKET"], proxy.url, iterations=1,
                                          heldout=False))
        await wait_for(lambda: condition(cluster, "outage", "StorageReachable").get("status") == "False", 60,
                       "StorageReachable=False")
        cond = condition(cluster, "outage", "StorageReachable")
        assert cond["reason"] == "StorageUnreachable" and "unreachable" in cond["message"].lower()
        assert condition(cluster, "outage", "Progressing")["reason"] == "StorageUnreachable"
        assert phase(cluster, "outage") == "Running"
        assert stages(cluster, "outage")["iter-01/generate"]["state"] == "Running"  # not done without a manifest
        n_jobs = len(cluster.jobs())
        await asyncio.sleep(1.5)
        assert len(cluster.jobs()) == n_jobs  # nothing new starts while storage is away
        await proxy.up()
        assert await finish(cluster, "outage") == "Succeeded"
        await op.stop()
    assert condition(cluster, "outage", "StorageReachable")["status"] == "True"
    reasons = [e["reason"] for e in cluster.events()]
    assert "StorageUnreachable" in reasons and "StorageReachable" in reasons
    await proxy.down()


async def test_run_deleted_mid_stage_no_crash_no_new_jobs(cluster, s3_env, operator_logs):
    op = OperatorRunner(cluster.url, ["ns"])
    harness = Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=1.5)
    async with harness:
        await op.start()
        await cluster.create_run(tiny_run("gone", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"]))
        await wait_for(lambda: "gone-i01-generate-a1" in cluster.jobs(), 60, "generate Job")
        status, _ = await cluster.delete_run("gone")
        assert status == 200
        await wait_for(lambda: cluster.run("gone") is None, 20, "the run to go (finalizer released)")
        before = set(cluster.all_jobs_ever())
        # The Jobs left behind (no garbage collector here) finish; their events reach the operator.
        await wait_for(lambda: all(op_harness_finished(cluster, j) for j in cluster.jobs()), 30, "jobs to end")
        await asyncio.sleep(1.0)
        assert set(cluster.all_jobs_ever()) == before
        assert op.alive()
        await op.stop()
    errors = [ln for ln in operator_logs.lines if ln.startswith(("ERROR", "CRITICAL"))]
    assert not errors, errors[:5]


async def test_no_secret_value_in_status_events_logs_or_jobs(cluster, s3_server, operator_logs):
    """Credentials come only from the referenced Secret: the pods get them by reference (the harness resolves it as
    the kubelet would), the operator reads them to check manifests, and no value shows in what it writes."""
    import boto3

    key_id, secret_key = "AKIASPATESTKEY0001", "spa-test-secret-value-9f8e7d6c5b4a"
    bucket = f"sec-{int(time.time() * 1000) % 10**9}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=key_id,
                 aws_secret_access_key=secret_key).create_bucket(Bucket=bucket)
    await cluster.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key})
    op = OperatorRunner(cluster.url, ["ns"])
    async with Harness(cluster, pod_base_env(), stub=True, stub_seconds=0.2) as harness:
        await op.start()
        await cluster.create_run(tiny_run("secret", FAKE, bucket, s3_server, iterations=1, secret="s3-creds"))
        assert await finish(cluster, "secret") == "Succeeded", harness.log_text()[-2000:]
        await op.stop()
    written = json.dumps([cluster.run_history("secret"), cluster.events(), cluster.jobs()])
    logs = "\n".join(operator_logs.lines)
    for value in (key_id, secret_key):
        assert value not in written
        assert value not in logs
    assert "s3-creds" in json.dumps(cluster.jobs())  # referenced by name


async def test_invalid_runs_fail_with_a_condition_naming_the_field(s3_env):
    """Without the CRD's validation in front (the emulator accepts anything here), the operator turns every
    invalid run of test_crd.INVALID into phase Failed with a Failed condition naming the field; no Job starts."""
    async with start_cluster(validate_runs=False) as cluster:
        op = OperatorRunner(cluster.url, ["ns"])
        await op.start()
        for i, (doc, _field) in enumerate(INVALID):
            doc = json.loads(json.dumps(doc))
            doc["metadata"]["name"] = f"invalid-{i:02d}"
            status, body = await cluster.create_run(doc)
            assert status in (200, 201), body
        names = [f"invalid-{i:02d}" for i in range(len(INVALID))]
        await wait_for(lambda: all(phase(cluster, n) == "Failed" for n in names), 60, "all invalid runs Failed")
        for name, (_, field) in zip(names, INVALID, strict=True):
            cond = condition(cluster, name, "Failed")
            assert cond["status"] == "True" and cond["reason"] == "InvalidSpec", (name, cond)
            assert cond["message"].startswith(field + ":"), (name, field, cond["message"])
        assert op.alive() and cluster.jobs() == {}
        # Fixing the spec brings a run back.
        await cluster.patch_run("invalid-17", {"spec": {"training": {"beta": 0.1}}})
        await wait_for(lambda: phase(cluster, "invalid-17") in ("Pending", "Running"), 20, "fixed run to start")
        await op.stop()


async def start_one_iteration_run(cluster, s3_env, name: str) -> None:
    """Create a seed + 1 iteration run (stub data) and wait until its first (validate) Job exists."""
    await cluster.create_run(tiny_run(name, FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=1,
                                      heldout=False))
    await wait_for(lambda: f"{name}-i00-validate-a1" in cluster.jobs(), 30, "seed Job")


async def test_suspend_stops_new_stages_and_resume_goes_on(cluster, s3_env):
    op = OperatorRunner(cluster.url, ["ns"])
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=1.0):
        await op.start()
        await start_one_iteration_run(cluster, s3_env, "pausable")
        await cluster.patch_run("pausable", {"spec": {"suspend": True}})
        await wait_for(lambda: phase(cluster, "pausable") == "Suspended", 20, "Suspended")
        assert cluster.jobs()["pausable-i00-validate-a1"]["spec"]["suspend"] is True
        assert condition(cluster, "pausable", "Suspended")["status"] == "True"
        await asyncio.sleep(2.0)
        assert list(cluster.jobs()) == ["pausable-i00-validate-a1"]
        await cluster.patch_run("pausable", {"spec": {"suspend": False}})
        assert await finish(cluster, "pausable") == "Succeeded"
        await op.stop()


async def test_job_deleted_by_hand_is_retried(cluster, s3_env):
    """A running Job deleted behind the operator's back counts as a failed attempt and is retried."""
    op = OperatorRunner(cluster.url, ["ns"])
    # The stub runs long enough that the Job is still running when it is deleted, even on a loaded machine.
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=6.0):
        await op.start()
        await start_one_iteration_run(cluster, s3_env, "handdel")
        await asyncio.sleep(0.3)
        status, _ = await cluster.request("DELETE", "/apis/batch/v1/namespaces/ns/jobs/handdel-i00-validate-a1")
        assert status == 200
        assert await finish(cluster, "handdel") == "Succeeded"
        await op.stop()
    seed = stages(cluster, "handdel")["iter-00/validate"]
    assert (seed["attempts"], seed["failures"], seed["job"]) == (2, 1, "handdel-i00-validate-a2")


async def test_spec_change_after_start_rejected_by_api_and_failed_by_operator(s3_env):
    """The CRD's transition rule rejects a spec edit once stages started; without it in front, the operator fails
    the run with SpecImmutable naming the field. suspend stays editable."""
    for validate in (True, False):
        async with start_cluster(validate_runs=validate) as cluster:
            op = OperatorRunner(cluster.url, ["ns"])
            async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=3.0):
                await op.start()
                await cluster.create_run(tiny_run("frozen", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"],
                                                  iterations=1, heldout=False))
                await wait_for(lambda c=cluster: stages(c, "frozen"), 30, "a started stage")
                status, body = await cluster.patch_run("frozen", {"spec": {"training": {"beta": 0.3}}})
                if validate:
                    assert status == 422 and "immutable" in body["message"], body
                    status, _ = await cluster.patch_run("frozen", {"spec": {"suspend": True}})
                    assert status == 200
                    await wait_for(lambda c=cluster: phase(c, "frozen") == "Suspended", 20, "Suspended")
                else:
                    assert status == 200
                    await wait_for(lambda c=cluster: phase(c, "frozen") == "Failed", 20, "Failed")
                    cond = condition(cluster, "frozen", "Failed")
                    assert cond["reason"] == "SpecImmutable" and cond["message"].startswith("spec.training.beta:")
                await op.stop()
