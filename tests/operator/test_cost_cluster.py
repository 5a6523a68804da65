"""The cost ledger and the ETA through the real operator on the emulated cluster: a 3-iteration run whose rates are
known (tests/operator/stub_worker.py with STUB_ITEM_SECONDS: generate, judge and train take a fixed time per prompt,
and iterations grow 3 -> 6 -> 9 prompts), its status.cost summed from the stages' ledgers, the ETA "unknown" until a
stage of every kind has finished, then within 25% of the real remaining time after iteration 1, and the per-run
Prometheus counters, removed with the run."""

from __future__ import annotations

import asyncio
import time

import pytest
from cluster import Harness, pod_base_env
from operator_runner import OperatorRunner
from prometheus_client import generate_latest
from runs import tiny_run, wait_for
from spa_workers.contract import Ledger

pytestmark = pytest.mark.asyncio
FAKE = {"model": "/models/sft", "seed": "/data/seed.jsonl", "prompts": "/data/prompts.jsonl",
        "heldout": "/data/heldout.jsonl"}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
PROMPTS = [3, 6, 9]
ITEM_S = 0.3


def _done(status: dict, *keys: str) -> bool:
    states = {s["name"]: s["state"] for s in status.get("stages") or []}
    return all(states.get(k) == "Succeeded" for k in keys)


def _sample(text: str, name: str, run: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'run="{run}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_cost_and_eta_of_a_run_with_known_rates(cluster, s3_env):
    op = OperatorRunner(cluster.url, ["ns"])
    env = pod_base_env({**S3_KEYS, "STUB_ITEM_SECONDS": str(ITEM_S)})
    doc = tiny_run("eta", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=3)
    doc["spec"]["iterations"]["promptsPerIteration"] = PROMPTS
    snapshot: dict = {}
    async with Harness(cluster, env, stub=True, stub_seconds=0.1):
        ctl = await op.start()
        await cluster.create_run(doc)
        try:
            def after_iteration_1():
                st = (cluster.run("eta") or {}).get("status") or {}
                if _done(st, "iter-01/train", "iter-01/evaluate") and "at" not in snapshot:
                    snapshot.update(at=time.time(), status=st)
                return st.get("phase") in ("Succeeded", "Failed")

            await wait_for(after_iteration_1, 240, "the run to end", interval=0.02)
            ended = time.time()
            run = cluster.run("eta")
            assert run["status"]["phase"] == "Succeeded", run["status"]
            metrics = lambda: generate_latest(ctl.metrics.registry).decode()  # noqa: E731
            # exported right after the status is written
            await wait_for(lambda: _sample(metrics(), "spa_run_progress_percentage", "eta") == 100, 10, "export")
            text = metrics()
            # removed with the run
            await cluster.delete_run("eta")
            await wait_for(lambda: cluster.run("eta") is None, 30, "the run to go")
            await asyncio.sleep(0.5)
            after_delete = generate_latest(ctl.metrics.registry).decode()
        finally:
            await op.stop()

    st = run["status"]
    # The ledger summed over the stages: every figure the stubs counted, exactly.
    total = st["cost"]["total"]
    answers = 2 * sum(PROMPTS)
    assert total[Ledger.PROMPTS] == sum(PROMPTS) and total[Ledger.ANSWERS_GENERATED] == answers
    assert total[Ledger.TOKENS_GENERATED] == answers * 4
    assert total[Ledger.PAIRS_JUDGED] == sum(PROMPTS)
    assert total[Ledger.PAIRS_TRAINED] == 8 + sum(PROMPTS)  # seed pairs (1 epoch) + one per judged prompt
    assert total[Ledger.GOLD_LABELS] == 8 + 4
    assert total[Ledger.ACCELERATOR_SECONDS] == 0  # no GPU requested
    assert total[Ledger.CPU_SECONDS] > 0 and total[Ledger.BYTES_WRITTEN] > 0 and total[Ledger.BYTES_READ] > 0
    assert "estimated" not in st["cost"]  # nothing estimated: every entry counted
    by_stage = {s["name"]: s for s in st["stages"]}
    assert sum(s["ledger"].get(Ledger.TOKENS_GENERATED, 0) for s in by_stage.values()) == answers * 4
    assert by_stage["iter-03/generate"]["ledger"][Ledger.PROMPTS] == 9
    assert st["progressPercentage"] == 100 and st["estimatedRemainingSeconds"] == 0

    # "unknown" until a stage of every kind still to run has finished (the first train is iteration 1's)
    history = cluster.run_history("eta")
    before = [h["status"] for h in history if (h.get("status") or {}).get("stages")
              and not _done(h["status"], "iter-01/train")]
    assert before and all(h.get("estimatedRemaining") == "unknown" and "estimatedRemainingSeconds" not in h
                          for h in before)

    # After iteration 1 the estimate is within 25% of the time the run really took from there.
    est = snapshot["status"]["estimatedRemainingSeconds"]
    real = ended - snapshot["at"]
    print(f"estimate after iteration 1: {est} s, real: {real:.1f} s")
    assert abs(est - real) <= 0.25 * real, (est, real)
    assert 0 < snapshot["status"]["progressPercentage"] < 100

    # Prometheus: per-run counters with the status's totals; gone once the run is deleted.
    assert _sample(text, "spa_run_tokens_generated_total", "eta") == answers * 4
    assert _sample(text, "spa_run_pairs_trained_total", "eta") == 8 + sum(PROMPTS)
    assert _sample(text, "spa_run_progress_percentage", "eta") == 100
    assert _sample(after_delete, "spa_run_tokens_generated_total", "eta") is None
    assert _sample(after_delete, "spa_run_progress_percentage", "eta") is None
