"""One optimiser step is one global batch, however it is laid out, and a multi-process stage outlives a slow upload.

The real `spa-worker train` on the tiny models, 10 pairs, batch 4, 2 epochs (each epoch 4 + 4 + 2 pairs), λ = 0.5,
a window of 8 (so it evicts): 1 process; 1 process with 2 accumulation steps of 2; 2 processes (FSDP2 on gloo)
of 2. With 2 processes accelerate's `even_batches` pads each epoch's last step with 2 pairs from the epoch's start;
they must reach neither the loss, nor the window, nor the log. The SPA window takes each optimiser step's scores
once, after the step, so the three runs see the same thresholds, scores and losses.

The 2-process run also writes its stage to S3 through a store that holds every PUT of the final model's files for
HOLD_S seconds (tests/slow_store.py), longer in all than the collective timeout it is given
(SPA_COLLECTIVE_TIMEOUT_S, standing in for NCCL's 10 minutes): the process group must carry that timeout (each rank
says so), and rank 0's upload must not happen while the others wait inside one of its collectives.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from by_hand import quantile
from spa_workers import contract, storage
from spa_workers.data import read_records, write_jsonl
from workerproc import run_worker

pytestmark = pytest.mark.slow

WINDOW, QUANTILE = 8, 0.5
COLLECTIVE_TIMEOUT_S = 20
HOLD_S = 6  # per PUT of a final-model file: 5+ files, so the upload outlasts the collective timeout


@pytest.fixture(scope="module")
def base(tiny, tiny_policy, tmp_path_factory) -> list[str]:
    """A policy that differs from its reference, so that margins spread from the first step, and a small learning
    rate, so that they stay spread: the window's median leaves samples on both sides, and refinement acts."""
    pairs = str(tmp_path_factory.mktemp("layout") / "pairs.jsonl")
    write_jsonl(pairs, read_records(tiny["seed"])[:10])
    return ["train", "--model", tiny_policy, "--reference", tiny["model"], "--pairs", pairs, "--batch-size", "4",
            "--epochs", "2", "--learning-rate", "1e-4", "--max-length", "64", "--seed", "0", "--extrapolation", "0.5",
            "--window", str(WINDOW), "--low-confidence-fraction", str(QUANTILE), "--warmup-fraction", "0.2",
            "--checkpoint-every-minutes", "0"]


def read_log(stage_dir: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(stage_dir, "train_log.jsonl")).splitlines()]


@pytest.fixture(scope="module")
def layouts(base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, extra in (("one", []), ("accumulation", ["--per-device-batch-size", "2"])):
        out[name] = str(root / name)
        proc = run_worker(*base, *extra, "--output", out[name])
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_slow(base, s3_server):
    """2 processes, output on S3 behind the slow store, a short collective timeout; (output URI, stderr, store)."""
    import boto3
    from slow_store import SlowStore

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    with SlowStore(s3_server, delay=HOLD_S, match="/train/model/") as store, pytest.MonkeyPatch.context() as mp:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "SPA_S3_ENDPOINT": store.url,
               "SPA_COLLECTIVE_TIMEOUT_S": str(COLLECTIVE_TIMEOUT_S)}
        for k, v in env.items():
            mp.setenv(k, v)
        storage.reset_client()
        out = f"s3://{bucket}/run/iter-01/train"
        proc = run_worker(*base, "--processes", "2", "--output", out, env=env)
        assert proc.returncode == 0, proc.stderr[-5000:]
        yield {"out": out, "stderr": proc.stderr, "held_s": store.held_s, "held": list(store.held),
               "log": read_log(out), "manifest": json.loads(storage.read_text(storage.join(out, contract.MANIFEST)))}
    storage.reset_client()


def test_process_group_has_the_configured_timeout_and_a_slow_upload_does_not_kill_the_launch(two_slow):
    timeouts = dict(re.findall(r"rank (\d): process group gloo, collective timeout (\S+) s", two_slow["stderr"]))
    assert timeouts == {"0": str(COLLECTIVE_TIMEOUT_S), "1": str(COLLECTIVE_TIMEOUT_S)}, two_slow["stderr"][-3000:]
    assert any("model.safetensors" in p for p in two_slow["held"])
    assert two_slow["held_s"] > COLLECTIVE_TIMEOUT_S  # the upload outlasted the collective timeout ...
    m = two_slow["manifest"]  # ... and the stage still published, with both processes
    assert m["counts"]["processes"] == 2 and "model/model.safetensors" in m["files"]


def test_thresholds_do_not_depend_on_processes_or_accumulation(layouts, two_slow):
    runs = {"one": read_log(layouts["one"]), "accumulation": read_log(layouts["accumulation"]),
            "two processes": two_slow["log"]}
    one = runs["one"]
    assert [r["samples"] for r in one] == [4, 4, 2, 4, 4, 2]
    # the window as SPA defines it: each step judged against the last WINDOW scores before it, pushed after it
    history: list[float] = []
    for rec in one:
        assert rec["window_size"] == min(len(history), WINDOW)
        if history:
            assert rec["threshold"] == pytest.approx(quantile(history[-WINDOW:], QUANTILE), abs=1e-9)
        else:
            assert rec["threshold"] is None  # the first step: empty window, nobody low-confidence
        history += rec["scores"]
    assert any(r["refined_fraction"] > 0 for r in one)  # refinement acted after the warm-up
    for name, log in runs.items():
        assert [r["samples"] for r in log] == [4, 4, 2, 4, 4, 2], name  # the padded pairs are not counted
        for a, b in zip(one, log, strict=True):
            assert b["window_size"] == a["window_size"], name
            assert (b["threshold"] is None) == (a["threshold"] is None), name
            if a["threshold"] is not None:
                assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-5), (name, a["step"])
            assert b["scores"] == pytest.approx(a["scores"], abs=1e-5), (name, a["step"])
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (name, a["step"])
    assert two_slow["log"][1]["rank_thresholds"] == [two_slow["log"][1]["threshold"]] * 2
