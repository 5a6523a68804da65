"""The quality gate on the emulated cluster: a run whose held-out agreement falls stops at the right iteration,
ends Succeeded with a condition saying why, and publishes the best iteration's model in status.outputs, which says
what the run's PUBLISHED.json in storage says (model, iteration, reason); a gate that holds publishes the last.
Pods run tests/operator/stub_worker.py, whose evaluate stage reports the agreement STUB_AGREEMENT scripts."""

from __future__ import annotations

import json

import pytest
from cluster import Harness, pod_base_env
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_operator import kube
from spa_operator.planner import PUBLISHED_FILE
from spa_workers import storage

pytestmark = pytest.mark.asyncio
FAKE = {"model": "/models/sft", "seed": "/data/seed.jsonl", "prompts": "/data/prompts.jsonl",
        "heldout": "/data/heldout.jsonl"}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


async def gated_run(cluster, s3_env, name: str, agreement: str, iterations: int) -> tuple[dict, str]:
    """Run `name` to its end on the emulated cluster, iteration i's evaluate reporting agreement[i] (stub pods), with
    gate {heldoutAgreement, maxDrop 0.1}; returns its status and its storage root."""
    op = OperatorRunner(cluster.url, ["ns"])
    async with Harness(cluster, pod_base_env({**S3_KEYS, "STUB_AGREEMENT": agreement}), stub=True,
                       stub_seconds=0.2):
        await op.start()
        await cluster.create_run(tiny_run(name, FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"],
                                          iterations=iterations, gate={"metric": "heldoutAgreement", "maxDrop": 0.1}))
        try:
            await wait_for(lambda: phase(cluster, name) in ("Succeeded", "Failed"), 120, "the run to end")
        finally:
            await op.stop()
    run = cluster.run(name)
    return run["status"], kube.run_root(f"s3://{s3_env['BUCKET']}/runs", "ns", name, run["metadata"]["uid"])


async def test_gate_stops_the_run_and_publishes_the_best_model(cluster, s3_env):
    # iteration 2's agreement is 0.2 below iteration 1's: the gate (maxDrop 0.1) stops the run there
    st, root = await gated_run(cluster, s3_env, "gated", "0.95,0.9,0.7,0.9", iterations=3)
    assert st["phase"] == "Succeeded", st
    names = {s["name"] for s in st["stages"]}
    assert "iter-02/evaluate" in names and not any(n.startswith("iter-03") for n in names)
    assert st["stages"][-1]["metrics"]["heldout_agreement"] == 0.7
    reason = ("gate: heldoutAgreement 0.7 at iteration 2 dropped 0.2 below best iteration 1 (0.9): more than "
              "maxDrop 0.1 and 2.6 standard errors of the difference (0)")
    # one story: status.outputs and the run's PUBLISHED.json name the same model, iteration and reason
    assert st["outputs"] == {"model": f"{root}/iter-01/train/model", "iteration": 1, "reason": reason,
                             "stoppedByGate": True}
    assert json.loads(storage.read_text(f"{root}/{PUBLISHED_FILE}")) == st["outputs"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and reason in ready["message"], ready
    assert any("gate: heldoutAgreement 0.7" in e["message"] for e in cluster.events() if e["reason"] == "RunSucceeded")


async def test_a_gate_that_holds_publishes_the_last_model_with_its_reason(cluster, s3_env):
    st, root = await gated_run(cluster, s3_env, "held", "0.95,0.9,0.88", iterations=2)
    assert st["phase"] == "Succeeded" and st["outputs"] == {
        "model": f"{root}/iter-02/train/model", "iteration": 2, "stoppedByGate": False,
        "reason": "gate: heldoutAgreement held; best iteration 1 (0.9); the last iteration's model is published"}
    assert json.loads(storage.read_text(f"{root}/{PUBLISHED_FILE}")) == st["outputs"]
