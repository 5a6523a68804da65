"""Finite numbers only (DESIGN §4): a diverged or corrupt model fails its stage with a line naming the number,
nothing is published, and no writer emits the bare NaN/Infinity tokens.

Why it matters on a cluster: the stage's metrics are copied into the AlignmentRun's status, and a real Kubernetes
API server decodes JSON with Go's encoding/json, which refuses `NaN` (400 "invalid character 'N'"); one NaN there
froze a run's status for good (issue 18, item 2)."""

from __future__ import annotations

import json
import math
import os

import pytest
from spa_workers import contract, storage
from spa_workers.contract import StageManifest
from spa_workers.data import write_jsonl
from workerproc import run_worker


def test_dumps_refuses_non_finite_numbers():
    assert contract.dumps({"a": 1.5}) == '{"a": 1.5}'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError):
            contract.dumps({"metrics": {"loss": bad}})


def test_non_finite_names_where():
    assert contract.non_finite({"a": 1.0, "b": {"c": [1.0, math.nan]}, "d": True, "e": 3}) == ["b.c[1]=nan"]
    with pytest.raises(contract.StageInputError, match=r"train: x: non-finite metrics.loss=inf"):
        contract.require_finite({"metrics": {"loss": math.inf}}, "train: x")


def test_manifest_written_before_the_rule_loses_its_nan_when_read(tmp_path):
    """An old manifest (written with Python's default allow_nan) never passes NaN on to a reader."""
    (tmp_path / contract.MANIFEST).write_text(
        '{"stage": "train", "files": {}, "metrics": {"loss": NaN, "reward_accuracy": 0.5}, "counts": {"pairs": 4},'
        ' "timings": {"wall_s": Infinity}}')
    m = contract.read_manifest(str(tmp_path))
    assert m.metrics == {"reward_accuracy": 0.5} and m.timings == {} and m.counts == {"pairs": 4}
    json.loads(m.to_json(), parse_constant=lambda c: pytest.fail(f"non-finite {c} written"))


def test_manifest_refuses_non_finite_and_unknown_ledger_entries():
    with pytest.raises(ValueError):
        StageManifest(stage="train", files={}, metrics={"loss": math.nan}).to_json()
    with pytest.raises(ValueError, match="unknown"):
        contract.check_ledger({"gpu_hours": 1.0}, "train")
    with pytest.raises(ValueError, match="negative"):
        contract.check_ledger({contract.Ledger.TOKENS_TRAINED: -1}, "train")


@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory) -> str:
    """The tiny model with a corrupt (NaN) final norm: every log-probability it gives is NaN."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("nan-model"))
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny["model"]).save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_diverged_training_step_fails_the_stage_naming_the_loss(tiny, nan_model, tmp_path):
    out = str(tmp_path / "seed-train")
    r = run_worker("seed-train", "--model", nan_model, "--pairs", tiny["seed"], "--output", out,
                   "--batch-size", "4", "--max-length", "64", "--epochs", "1", "--learning-rate", "1e-4",
                   "--no-refinement")
    assert r.returncode == contract.EXIT_BAD_INPUT, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "error: the DPO loss is nan" in last and "optimizer step 1" in last, last
    assert not os.path.exists(os.path.join(out, contract.MANIFEST))
    assert not os.path.exists(os.path.join(out, contract.MODEL_SUBDIR))  # nothing published


@pytest.mark.slow
def test_a_nan_reward_fails_the_judge_before_anything_is_published(tiny, nan_model, tmp_path):
    responses = str(tmp_path / "generate" / "shard-00000-of-00001")
    rows = [{"prompt_index": i, "prompt": [{"role": "user", "content": f"Say {w}."}],
             "responses": [f"{w} once.", f"{w} twice, {w}."]} for i, w in enumerate(("yes", "no", "maybe", "never"))]
    write_jsonl(os.path.join(responses, contract.RESPONSES_FILE), rows)
    storage.write_text(os.path.join(responses, contract.MANIFEST),
                       StageManifest(stage="generate", files={}).to_json())
    out = str(tmp_path / "judge")
    r = run_worker("judge", "--policy", nan_model, "--reference", tiny["model"], "--responses",
                   str(tmp_path / "generate"), "--output", out, "--shard-index", "0", "--max-length", "64")
    assert r.returncode == contract.EXIT_BAD_INPUT, r.stderr[-2000:]
    assert "non-finite" in r.stderr and "nan" in r.stderr.strip().splitlines()[-1], r.stderr[-1000:]
    shard = os.path.join(out, "shard-00000-of-00001")
    assert not os.path.exists(os.path.join(shard, contract.MANIFEST))
    assert not os.path.exists(os.path.join(shard, contract.PAIRS_FILE))
