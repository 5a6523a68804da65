"""A full AlignmentRun on the emulated cluster with the real workers: seed DPO + 2 SPA iterations (with held-out
evaluation) on the tiny offline model, S3 on moto, credentials from a Secret. The harness runs each Job's container
command — `spa-worker <stage> ...` — as a local process with the Job's env."""

from __future__ import annotations

import asyncio
import json

import boto3
import pytest
from cluster import Harness, pod_base_env
from operator_runner import OperatorRunner
from runs import STAGES_2_ITER, phase, tiny_run, wait_for
from spa_operator import kube

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def test_full_run_seed_and_two_iterations_succeeds(cluster, tiny, s3_server, operator_logs):
    key_id, secret_key = "AKIAFULLRUN000001", "full-run-secret-value-0a1b2c3d"
    bucket = "full-run"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id=key_id,
                      aws_secret_access_key=secret_key)
    s3.create_bucket(Bucket=bucket)
    await cluster.create_secret("s3", {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key})
    op = OperatorRunner(cluster.url, ["ns"], progress_s=0.5)
    harness = Harness(cluster, pod_base_env(), max_pods=1)
    async with harness:
        await op.start()
        status, body = await cluster.create_run(tiny_run("tiny-spa", tiny, bucket, s3_server, secret="s3",
                                                         generation={"maxNewTokens": 8, "backend": "transformers",
                                                                     "shards": 2}))
        assert status in (200, 201), body
        try:
            await wait_for(lambda: phase(cluster, "tiny-spa") in ("Succeeded", "Failed"), 1500, "the run to end",
                           interval=0.5)
        finally:
            await op.stop()
        run = cluster.run("tiny-spa")
        assert run["status"]["phase"] == "Succeeded", (run["status"], harness.log_text()[-3000:])

    st = run["status"]
    by_stage = {s["name"]: s for s in st["stages"]}
    assert sorted(by_stage) == sorted(STAGES_2_ITER)
    assert all(s["state"] == "Succeeded" and s["attempts"] == 1 for s in by_stage.values())
    root = kube.run_root(f"s3://{bucket}/runs", "ns", "tiny-spa", run["metadata"]["uid"])
    assert st["outputs"]["model"] == f"{root}/iter-02/train/model"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=st["outputs"]["model"].split("/", 3)[3])
            .get("Contents", [])]
    assert any(k.endswith("config.json") for k in keys) and any(k.endswith(".safetensors") for k in keys)
    assert by_stage["iter-01/judge"]["metrics"]["pairs"] > 0
    assert "heldout_agreement" in by_stage["iter-02/evaluate"]["metrics"]
    # The generate stage ran as an Indexed Job with 2 pods.
    gen = cluster.jobs()["tiny-spa-i01-generate-a1"]["spec"]
    assert gen["completionMode"] == "Indexed" and gen["completions"] == 2
    # Progress was reported between 0 and 1 while stages ran; conditions say where it ended.
    progresses = {h.get("status", {}).get("progress") for h in cluster.run_history("tiny-spa")}
    assert any(p is not None and 0 < p < 1 for p in progresses), progresses
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Failed"]["status"] == "False"
    reasons = [e["reason"] for e in cluster.events()]
    assert reasons.count("StageStarted") == len(STAGES_2_ITER) and "RunSucceeded" in reasons
    written = json.dumps([cluster.run_history("tiny-spa"), cluster.events(), cluster.jobs()])
    logs = "\n".join(operator_logs.lines)
    assert secret_key not in written and secret_key not in logs and key_id not in written
    await asyncio.sleep(0)
