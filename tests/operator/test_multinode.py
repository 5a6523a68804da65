"""Multi-node training stages on the emulated cluster: the harness runs a gang's pods (an Indexed Job under a headless
Service) at once as local processes that meet on loopback; a disrupted pod fails the attempt without leaving its
peers waiting; and, through the operator, a run whose train stage has two nodes trains one model with both."""

from __future__ import annotations

import asyncio
import json
import time

import boto3
import pytest
from cluster import Harness, pod_base_env
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_operator import jobs, kube
from spa_operator.planner import stage_graph
from spa_operator.spec import parse_run
from spa_workers import contract

pytestmark = pytest.mark.asyncio
RUN = jobs.RunRef(name="gang", namespace="ns", uid="6f1c0a52-0000-4000-8000-000000000001")


def gang_job(tmp_path, nodes: int = 2) -> dict:
    # Local inputs the stub worker can fingerprint (it reads them, as the real worker does, but trains nothing).
    (tmp_path / "sft").mkdir(exist_ok=True)
    (tmp_path / "sft" / "config.json").write_text("{}")
    for name in ("seed.jsonl", "prompts.jsonl"):
        (tmp_path / name).write_text("{}\n")
    doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "gang"},
           "spec": {"model": {"sft": str(tmp_path / "sft")},
                    "data": {"seed": str(tmp_path / "seed.jsonl"), "prompts": str(tmp_path / "prompts.jsonl")},
                    "iterations": {"count": 1, "promptsPerIteration": 4},
                    "resources": {"seedTrain": {"nodes": nodes, "scratch": "1Gi"}}}}
    spec = parse_run(doc).spec
    seed = next(s for s in stage_graph(spec, str(tmp_path / "runs")) if s.stage == "seed-train")
    job, _service = jobs.build_stage_objects(seed, 1, RUN, spec)
    return job


async def create(cluster, job: dict) -> None:
    status, body = await cluster.request("POST", "/apis/batch/v1/namespaces/ns/jobs", job)
    assert status in (200, 201), body


def finished(cluster, name: str) -> dict | None:
    conds = (cluster.jobs().get(name, {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)


async def test_gang_pods_run_together_and_find_index_zero_on_loopback(cluster, tmp_path):
    job = gang_job(tmp_path)
    name = job["metadata"]["name"]
    harness = Harness(cluster, pod_base_env(), stub=True, stub_seconds=3.0, max_pods=1)
    env = {i: harness._pod_env(job, i, tmp_path / f"pod{i}") for i in (0, 1)}
    assert env[0]["SPA_RENDEZVOUS_HOST"] == env[1]["SPA_RENDEZVOUS_HOST"] == "127.0.0.1"  # as cluster DNS would
    assert (env[0]["JOB_COMPLETION_INDEX"], env[1]["JOB_COMPLETION_INDEX"]) == ("0", "1")
    assert env[0]["SPA_SCRATCH_DIR"] != env[1]["SPA_SCRATCH_DIR"]  # each pod its own scratch volume
    async with harness:
        t0 = time.monotonic()
        await create(cluster, job)
        cond = await wait_for(lambda: finished(cluster, name), 120, "the gang Job to finish")
        elapsed = time.monotonic() - t0
    assert cond["type"] == "Complete", harness.log_text()[-2000:]
    assert sorted((i, code) for n, i, _, code in harness.pods if n == name) == [(0, 0), (1, 0)]
    # max_pods=1 would run one 3-second pod after the other; a gang's pods run together.
    assert elapsed < 2 * 3.0 + 3.0, elapsed


async def test_a_disrupted_gang_pod_fails_the_attempt_and_stops_its_peers(cluster, tmp_path):
    job = gang_job(tmp_path)
    name = job["metadata"]["name"]
    harness = Harness(cluster, pod_base_env(), stub=True, stub_seconds=300.0,
                      fault=lambda j, index, attempt: "disrupt" if index == 1 else None)
    async with harness:
        t0 = time.monotonic()
        await create(cluster, job)
        cond = await wait_for(lambda: finished(cluster, name), 60, "the gang Job to fail")
        elapsed = time.monotonic() - t0
    # Not replaced (a lone survivor would wait for its peer forever) and not waited out: the whole attempt fails.
    assert cond["type"] == "Failed" and cond["reason"] == "PodFailurePolicy", cond
    assert not jobs.failed_by_bad_input(cond)  # the operator retries it (from the sharded checkpoint)
    assert elapsed < 30, elapsed
    assert [(i, a) for n, i, a, _ in harness.pods if n == name and i == 1] == [(1, 1)]


@pytest.mark.slow
async def test_two_nodes_train_one_model_together(cluster, tiny, s3_server):
    """Needs `spa-worker train --nodes 2` to launch a distributed run (helper "train"'s launcher: accelerate with the
    rendezvous at SPA_RENDEZVOUS_HOST:SPA_RENDEZVOUS_PORT, node rank = JOB_COMPLETION_INDEX). Without it each pod
    trains alone and the manifest says 1 process, so this fails."""
    bucket = "two-nodes"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    await cluster.create_secret("s3", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    op = OperatorRunner(cluster.url, ["ns"], progress_s=0.5)
    harness = Harness(cluster, pod_base_env(), max_pods=1)
    async with harness:
        await op.start()
        doc = tiny_run("two-nodes", tiny, bucket, s3_server, iterations=1, heldout=False, secret="s3",
                       resources={"train": {"nodes": 2, "scratch": "1Gi"}})
        status, body = await cluster.create_run(doc)
        assert status in (200, 201), body
        try:
            await wait_for(lambda: phase(cluster, "two-nodes") in ("Succeeded", "Failed"), 900, "the run to end",
                           interval=0.5)
        finally:
            await op.stop()
        run = cluster.run("two-nodes")
        assert run["status"]["phase"] == "Succeeded", (run["status"], harness.log_text()[-4000:])
    train_job = cluster.jobs()["two-nodes-i01-train-a1"]
    assert (train_job["spec"]["completionMode"], train_job["spec"]["completions"]) == ("Indexed", 2)
    assert sorted((i, code) for n, i, _, code in harness.pods if n == "two-nodes-i01-train-a1") == [(0, 0), (1, 0)]
    root = kube.run_root(f"s3://{bucket}/runs", "ns", "two-nodes", run["metadata"]["uid"])
    key = f"{root.split('/', 3)[3]}/iter-01/train/{contract.MANIFEST}"
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["counts"][contract.ManifestKeys.PROCESSES] == 2, manifest["counts"]  # one model, two nodes
    await asyncio.sleep(0)
