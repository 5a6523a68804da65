"""Tenancy through the real operator process on the emulated cluster: what a run may name is what the platform
allows (a run naming anything else fails with a condition naming the field, and no pod starts), worker pods mount no
ServiceAccount token, the chart's pod defaults and a run's own overrides reach the pods, and a multi-node stage under a
gang scheduler gets its pod group and says when the gang is incomplete.

Jobs complete instantly here (the harness's instant mode with a stand-in RunStore) except where pods matter."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes_validate
import pytest
from cluster import PODGROUPS, Harness, pod_base_env
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_operator.spec import PodOverrides
from spa_operator.worker_pod import COSCHEDULING_LABEL, GangScheduling, PodDefaults
from test_cluster_failures import Store, run_doc
from test_faults import FAKE, S3_KEYS, condition, finish, stages

pytestmark = pytest.mark.asyncio
ALLOWED = dict(allowed_service_accounts=("trainer",), allowed_judge_endpoints=("http://judge.llm.svc:8000/",),
               allowed_secrets=("s3-creds", "judge-key"), allowed_capabilities=("IPC_LOCK",))
WIN_RATE = {"winRate": {"prompts": "s3://d/w.jsonl", "judge": {"endpoint": "http://judge.llm.svc:8000/v1",
                                                                "model": "j", "secretRef": {"name": "judge-key"}}}}


async def run_to_the_end(cluster, doc: dict[str, Any], **cfg: Any) -> str:
    """One run through an operator configured with `cfg`, its Jobs completing at once; its final phase."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True), **cfg)
    async with Harness(cluster, {}, instant=True):
        await op.start()
        await cluster.create_run(doc)
        outcome = await finish(cluster, doc["metadata"]["name"], timeout=30)
        await op.stop()
    return outcome


def validated(job: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(job, desired_version=kubernetes_validate.latest_version(), strict=True)
    return job


# (run name, spec changes, the Failed condition's reason, the field its message names)
REFUSED = [
    ("sa", {"serviceAccountName": "default"}, "ServiceAccountNotAllowed", "spec.serviceAccountName"),
    ("judge", {"evaluation": {"winRate": {**WIN_RATE["winRate"], "judge": {
        **WIN_RATE["winRate"]["judge"], "endpoint": "https://collector.evil.example/v1"}}}},
     "JudgeEndpointNotAllowed", "spec.evaluation.winRate.judge.endpoint"),
    ("secret", {"storage": {"uri": "s3://bucket/runs", "secretRef": {"name": "other-team-s3"}}},
     "SecretNotAllowed", "spec.storage.secretRef.name"),
    ("cap", {"resources": {"train": {"capabilities": ["SYS_ADMIN"]}}}, "CapabilityNotAllowed",
     "spec.resources.train.capabilities"),
]


async def test_a_run_naming_what_the_platform_does_not_allow_fails_naming_the_field(cluster):
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True), **ALLOWED)
    async with Harness(cluster, {}, instant=True):
        await op.start()
        for name, spec, _, _ in REFUSED:
            status, body = await cluster.create_run(run_doc(name, **spec))
            assert status in (200, 201), body  # the CRD cannot know the platform's lists: the operator refuses
        await cluster.create_run(run_doc("ok", serviceAccountName="trainer", evaluation=WIN_RATE))
        await wait_for(lambda: all(phase(cluster, n) == "Failed" for n, *_ in REFUSED), 30, "refused runs Failed")
        assert await finish(cluster, "ok", timeout=30) == "Succeeded"
        assert op.alive()
        await op.stop()
    for name, _, reason, field in REFUSED:
        cond = condition(cluster, name, "Failed")
        assert (cond["status"], cond["reason"]) == ("True", reason), (name, cond)
        assert cond["message"].startswith(field + ":"), (name, cond["message"])
        assert not [j for j in cluster.all_jobs_ever() if j.startswith(f"{name}-")]  # no pod ever started
    # The allowed account was named: its pods follow the account's own token setting.
    assert all("automountServiceAccountToken" not in job["spec"]["template"]["spec"]
               and job["spec"]["template"]["spec"]["serviceAccountName"] == "trainer"
               for job in cluster.jobs().values())


async def test_worker_pods_mount_no_token_by_default(cluster):
    """The cluster-wide install sets no worker account, so pods run as the namespace's `default`: they must not
    get its token (workers talk to S3, never to the API)."""
    assert await run_to_the_end(cluster, run_doc("plain", iterations=1)) == "Succeeded"
    pods = [validated(j)["spec"]["template"]["spec"] for j in cluster.jobs().values()]
    assert len(pods) >= 5
    assert all(p["automountServiceAccountToken"] is False and "serviceAccountName" not in p for p in pods)


async def test_chart_defaults_and_a_runs_overrides_reach_the_pods(cluster):
    defaults = PodDefaults(
        all=PodOverrides.model_validate({"labels": {"team": "ml"}, "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]}),
        gpu=PodOverrides.model_validate({
            "extraResources": {"rdma/ib": "1"}, "env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}],
            "tolerations": [{"key": "rdma", "operator": "Exists", "effect": "NoSchedule"}],
            "capabilities": ["IPC_LOCK"]}))
    train = {"gpus": 8, "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
             "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net"},
             "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                 {"matchExpressions": [{"key": "fabric", "operator": "In", "values": ["ib-a"]}]}]}}},
             "schedulerName": "fabric-aware"}
    doc = run_doc("fabric", iterations=1, resources={"train": train})
    assert await run_to_the_end(cluster, doc, pod_defaults=defaults) == "Succeeded"
    by_stage = {j["metadata"]["annotations"]["spa.dev/stage-key"]: validated(j) for j in cluster.jobs().values()}
    pod = by_stage["iter-01/train"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_IB_HCA"] == "mlx5"  # the run's own wins over the chart's
    assert env["SPA_STAGE_KEY"] == "iter-01/train"  # the operator's own stay
    assert c["resources"]["limits"]["rdma/ib"] == c["resources"]["requests"]["rdma/ib"] == "1"
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "rdma-net"
    assert pod["metadata"]["labels"]["team"] == "ml" and pod["metadata"]["labels"]["spa.dev/stage"] == "train"
    assert pod["spec"]["affinity"] == train["affinity"] and pod["spec"]["schedulerName"] == "fabric-aware"
    assert pod["spec"]["tolerations"] == [{"key": "rdma", "operator": "Exists", "effect": "NoSchedule"}]
    # A CPU stage gets the defaults for every pod, not the fabric.
    validate = by_stage["iter-00/validate"]["spec"]["template"]
    vc = validate["spec"]["containers"][0]
    assert "rdma/ib" not in str(vc.get("resources")) and vc["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert validate["metadata"]["labels"]["team"] == "ml" and "NCCL_IB_HCA" not in str(vc["env"])


async def test_gang_scheduler_gets_a_pod_group_and_an_incomplete_gang_shows_and_times_out(cluster, s3_env):
    """Without Kueue, a multi-node stage under the coscheduling plugin: its pods carry the pod-group label and the
    scheduler's name, its PodGroup (minMember = nodes) and Service are owned by the Job, and when one pod cannot be
    placed the status says `1/2 pods scheduled`; past the pending timeout the attempt is given up (its GPUs freed)
    and the next attempt runs."""
    def fault(job: dict[str, Any], index: int, pod_attempt: int) -> str | None:
        first = job["metadata"]["name"].endswith("seed-train-a1")
        return "pending:Unschedulable" if first and index == 1 else None

    gang = GangScheduling("coscheduling", "scheduler-plugins-scheduler")
    op = OperatorRunner(cluster.url, ["ns"], pending_timeout_s=6.0, gang_scheduling=gang)
    resources = {"seedTrain": {"nodes": 2, "scratch": "1Gi"}}
    async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=1.0, fault=fault):
        await op.start()
        await cluster.create_run(tiny_run("gang", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=0,
                                          heldout=False, resources=resources))
        message = await wait_for(lambda: "pods scheduled" in ((cluster.run("gang") or {}).get("status") or {}).get(
            "message", "") and cluster.run("gang")["status"]["message"], 40, "the gang's state in the status")
        assert "iter-00/seed-train: gang incomplete: 1/2 pods scheduled (Unschedulable)" in message, message
        assert condition(cluster, "gang", "Progressing")["reason"] == "PodsPending"
        jobs_now = cluster.jobs()
        (job,) = [j for n, j in jobs_now.items() if n.endswith("seed-train-a1")]
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        template = job["spec"]["template"]
        assert template["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
        assert template["metadata"]["labels"][COSCHEDULING_LABEL] == name
        group = cluster._object(PODGROUPS, "ns", name).raw
        assert group["spec"]["minMember"] == 2
        service = cluster._object("v1/services", "ns", name).raw
        for owned in (group, service):  # they go with the Job (its TTL, its deletion), not with the run
            assert owned["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                             "uid": uid, "controller": True}]
        assert await finish(cluster, "gang", timeout=90) == "Succeeded"
        await asyncio.sleep(0)
        await op.stop()
    seed = stages(cluster, "gang")["iter-00/seed-train"]
    assert (seed["attempts"], seed["failures"]) == (2, 1)
    failed = [e["message"] for e in cluster.events() if e["reason"] == "StageFailed"]
    assert any("1/2 pods scheduled" in m and "pending timeout" in m for m in failed), failed


async def test_a_restarted_operator_creates_the_service_a_running_gang_lacks(cluster):
    """A gang's Service (and pod group) is created after its Job, owned by it: an operator stopped between the two
    creates leaves the Job without it, so the next operator creates it on its first look at the run."""
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True))
    durations = iter([0.1])  # validate finishes, then seed-train keeps running

    async with Harness(cluster, {}, instant=True, instant_after=lambda: next(durations, 600.0)):
        await op.start()
        await cluster.create_run(run_doc("gang", resources={"seedTrain": {"nodes": 2}}))
        job = await wait_for(lambda: next((n for n in cluster.jobs() if "seed-train" in n), None), 30,
                             "the gang's Job")
        await wait_for(lambda: cluster._object("v1/services", "ns", job) is not None, 10, "its Service")
        await op.stop()
        status, _ = await cluster.request("DELETE", f"/api/v1/namespaces/ns/services/{job}")
        assert status == 200 and cluster._object("v1/services", "ns", job).deleted
        await op.start()
        await wait_for(lambda: not cluster._object("v1/services", "ns", job).deleted, 20, "the Service again")
        await op.stop()
    owner = cluster._object("v1/services", "ns", job).raw["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("Job", cluster.jobs()[job]["metadata"]["uid"])
    assert not [n for n in cluster.all_jobs_ever() if "seed-train" in n and n != job]  # no second attempt
