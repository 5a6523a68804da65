"""The chart's RBAC against the requests the real operator makes (recorded by the emulator): every request is granted,
and every granted verb is used, either in the scenario below or on a path another test drives (named here)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster import Harness
from operator_runner import OperatorRunner
from runs import phase, wait_for
from spa_operator.worker_pod import GangScheduling
from test_cluster_failures import Store, run_doc
from test_faults import condition, finish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))
from chartlib import helm_template

pytestmark = pytest.mark.asyncio
TESTS = Path(__file__).resolve().parents[1]
# Granted verbs on paths the scenario does not take, each with the test that drives it through the operator (or why
# no test can: kopf's scanning is off against the emulator, and an RBAC check on ownerReferences is no request).
ELSEWHERE = {
    ("batch", "jobs", "delete"): "test_pending_pod_shows_its_reason_and_times_out",
    ("", "pods", "delete"): "test_orphaned_pods_stop_before_the_next_attempt",
    # KubeApi.create reads an object that exists already (409) to see whose it is; the scenario takes it for a Job.
    ("", "services", "get"): "a create answering 409 (KubeApi.create), as for the Job here",
    ("scheduling.x-k8s.io", "podgroups", "get"): "a create answering 409 (KubeApi.create), as for the Job here",
    ("kueue.x-k8s.io", "workloads", "list"): "test_suspend_with_kueue_pauses_the_running_job_through_its_workload",
    ("kueue.x-k8s.io", "workloads", "patch"): "test_suspend_with_kueue_pauses_the_running_job_through_its_workload",
    ("spa.dev", "alignmentruns/finalizers", "update"):
        "checked by OwnerReferencesPermissionEnforcement on Job creation: "
        "test_forbidden_job_creation_is_reported_then_recovers",
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"): "kopf's scanning (off against the emulator)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf's scanning (off against the emulator)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf's scanning (off against the emulator)",
    ("", "namespaces", "list"): "kopf, watching listed namespaces (kopf/_core/reactor/observation.py)",
    ("", "namespaces", "watch"): "kopf, watching listed namespaces (kopf/_core/reactor/observation.py)",
}


def granted(docs: list[dict[str, Any]], namespace: str) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], verb) the operator holds in `namespace` (Roles there, ClusterRoles)."""
    out = set()
    for d in docs:
        if d["kind"] == "ClusterRole" or (d["kind"] == "Role" and d["metadata"]["namespace"] == namespace):
            for rule in d.get("rules") or []:
                out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


async def test_the_chart_grants_what_the_operator_uses_and_nothing_more(cluster):
    await cluster.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    stranger = {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "taken-i00-validate-a1", "namespace": "ns"},
                "spec": {"template": {"spec": {"restartPolicy": "Never",
                                               "containers": [{"name": "c", "image": "busybox"}]}}}}
    status, _ = await cluster.request("POST", "/apis/batch/v1/namespaces/ns/jobs", stranger)
    assert status in (200, 201)
    op = OperatorRunner(cluster.url, ["ns"], store_factory=lambda run, secret: Store(done=True),
                        gang_scheduling=GangScheduling("coscheduling", "scheduler-plugins-scheduler"),
                        lease="spa-system/spa-spa-operator", identity="spa-operator-0")  # as the chart sets it
    async with Harness(cluster, {}, instant=True, instant_after=lambda: 1.5):
        await op.start()
        storage = {"uri": "s3://bucket/runs", "secretRef": {"name": "s3-creds"}}
        await cluster.create_run(run_doc("gang", storage=storage, resources={"seedTrain": {"nodes": 2}}))
        await cluster.create_run(run_doc("taken"))  # its Job's name is taken: the operator reads whose it is
        await cluster.create_run(run_doc("paused", iterations=1))
        await wait_for(lambda: phase(cluster, "paused") == "Running", 20, "paused to run")
        await cluster.patch_run("paused", {"spec": {"suspend": True}})  # its running Job is suspended (patch)
        await wait_for(lambda: phase(cluster, "paused") == "Suspended", 20, "Suspended")
        await cluster.patch_run("paused", {"spec": {"suspend": False}})
        assert await finish(cluster, "gang", timeout=30) == "Succeeded"
        assert await finish(cluster, "paused", timeout=30) == "Succeeded"
        await wait_for(lambda: condition(cluster, "taken", "Progressing").get("reason") == "JobCreationBlocked", 20,
                       "the taken Job name reported")
        await asyncio.sleep(0.5)
        await op.stop()
    used = {(group, f"{plural}/{sub}" if sub else plural, verb)
            for agent, group, plural, sub, verb in cluster.emulator.verbs
            if agent.startswith(("spa-operator", "kopf")) and plural}  # (API discovery needs no RBAC)
    docs = helm_template("--set", "watchNamespaces={ns}", "--set", "worker.gangScheduling.kind=coscheduling",
                         include_crds=False)
    rights = granted(docs, "ns") | granted(docs, "spa-system")  # the runs' namespace; the Lease's
    assert used - rights == set(), "the operator makes requests its chart RBAC refuses"
    unused = rights - used - set(ELSEWHERE)
    assert unused == set(), "the chart grants verbs nothing uses"
    assert not (set(ELSEWHERE) & used), "listed as used elsewhere but used here: drop it from ELSEWHERE"
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    for why in ELSEWHERE.values():
        test = why.split(": ")[-1]
        if test.startswith("test_"):
            assert f"def {test}(" in sources, test
