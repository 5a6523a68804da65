"""Bad input through the real `spa-worker` entry point: one clear line naming the file/row/model, exit != 0."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _single_error(proc, stage: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"spa-worker {stage}: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def _evaluate(worker, tiny, heldout: str, model: str | None = None, out: str = "out"):
    return worker("evaluate", "--policy", model or tiny["model"], "--reference", tiny["model"],
                  "--heldout", heldout, "--output", out)


def test_missing_file(worker, tiny, tmp_path):
    line = _single_error(_evaluate(worker, tiny, str(tmp_path / "nope.jsonl"), out=str(tmp_path / "o")),
                         "evaluate")
    assert f"{tmp_path / 'nope.jsonl'}: file not found" in line


def test_wrong_columns(worker, tiny, tmp_path):
    bad = tmp_path / "cols.jsonl"
    bad.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    line = _single_error(_evaluate(worker, tiny, str(bad), out=str(tmp_path / "o")), "evaluate")
    assert f"{bad}: row 1: missing column(s) chosen, rejected" in line


def test_unparsable_row(worker, tiny, tmp_path):
    bad = tmp_path / "rows.jsonl"
    ok = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    bad.write_text(ok + "\n" + '{"prompt": "p", "chosen": \n' + ok + "\n")
    line = _single_error(_evaluate(worker, tiny, str(bad), out=str(tmp_path / "o")), "evaluate")
    assert f"{bad}: row 2: not valid JSON" in line


def test_unknown_model(worker, tiny, tmp_path):
    line = _single_error(_evaluate(worker, tiny, tiny["heldout"], model=str(tmp_path / "no-model"),
                                   out=str(tmp_path / "o")), "evaluate")
    assert f"model {tmp_path / 'no-model'}: not found" in line


def test_unknown_hub_model_offline(worker, tiny, tmp_path):
    line = _single_error(worker("seed-train", "--model", "hf://no-such-org/no-such-model", "--pairs", tiny["seed"],
                                "--output", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"}), "seed-train")
    assert "model hf://no-such-org/no-such-model: not found" in line


def test_unknown_stage_and_bad_flag(worker):
    proc = worker("distill")
    assert proc.returncode == 2 and "usage: spa-worker" in proc.stderr
    proc = worker("generate", "--policy", "p")
    assert proc.returncode == 2 and "required" in proc.stderr


def test_unreachable_storage_is_retryable_not_bad_input(worker, tiny, tmp_path):
    env = {"SPA_S3_ENDPOINT": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = worker("evaluate", "--policy", tiny["model"], "--reference", tiny["model"], "--heldout", tiny["heldout"],
                  "--output", "s3://bucket/run/evaluate", env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]  # EXIT_STORAGE: executors retry, never fail the run for it
    assert "spa-worker evaluate: error: S3 unreachable" in proc.stderr
