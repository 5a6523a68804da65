"""End to end through the real CLI: `spa demo`, `spa plan`, `spa run` on local disk and on S3, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from spa_operator import warm
from spa_workers import contract, storage

pytestmark = pytest.mark.slow

STAGE_DIRS = ["iter-00/validate", "iter-00/seed-train", "iter-00/evaluate"] + [
    f"iter-{i:02d}/{s}" for i in (1, 2) for s in ("generate", "judge", "train", "evaluate")]


def spa(*argv: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spa_operator.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=1800, cwd=cwd)


def _manifest_dirs(root: Path) -> dict[str, list[Path]]:
    return {d: sorted((root / d).rglob(contract.MANIFEST)) for d in STAGE_DIRS}


def test_demo_runs_seed_and_two_iterations_then_is_a_noop(tmp_path):
    proc = spa("demo", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = tmp_path / "runs" / "default" / "tiny-demo"
    manifests = _manifest_dirs(root)
    assert all(manifests[d] for d in STAGE_DIRS), {d: len(m) for d, m in manifests.items()}
    # The per-iteration table and the final model.
    assert "per-iteration results" in proc.stdout
    results, cost = proc.stdout.split("tiny-demo: cost (~: estimated)")  # the results table, then the cost table
    first_cells = [ln.split("│")[1].strip() for ln in results.splitlines() if ln.count("│") > 2]
    assert first_cells == ["seed", "1", "2"], proc.stdout
    assert [ln.split("│")[1].strip() for ln in cost.splitlines() if ln.count("│") > 2] == ["seed", "1", "2", "total"]
    final = root / "iter-02" / "train" / "model"
    assert f"final model: {final}" in proc.stdout.replace("\n", "")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.model_type == "llama"
    judge = contract.StageManifest.from_json((root / "iter-01/judge").rglob(contract.MANIFEST).__next__()
                                             .read_text())
    assert judge.counts[contract.ManifestKeys.PAIRS] + judge.counts[contract.ManifestKeys.DROPPED_IDENTICAL] \
        + judge.counts[contract.ManifestKeys.DROPPED_EMPTY] == 32
    _check_ledger(root, manifests, proc.stdout)

    before = {p: p.stat().st_mtime_ns for ps in manifests.values() for p in ps}
    logs_before = sorted((root / "logs").iterdir())
    again = spa("demo", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for ps in _manifest_dirs(root).values() for p in ps} == before
    assert sorted((root / "logs").iterdir()) == logs_before  # no stage process was started
    assert "per-iteration results" in again.stdout


def _check_ledger(root: Path, manifests: dict[str, list[Path]], stdout: str) -> None:
    """Every stage counted what it spent; the report sums it per iteration; the console showed the ETA."""
    import json

    L = contract.Ledger
    read = {d: [contract.StageManifest.from_json(p.read_text()) for p in ps] for d, ps in manifests.items()}
    assert all(m.ledger.get(L.CPU_SECONDS, 0) > 0 and L.BYTES_WRITTEN in m.ledger and not m.ledger_estimated
               for ms in read.values() for m in ms)
    gen = read["iter-01/generate"][0]
    assert gen.ledger[L.TOKENS_GENERATED] == gen.counts[contract.ManifestKeys.GENERATED_TOKENS] > 0
    assert gen.ledger[L.ANSWERS_GENERATED] == 64 and gen.ledger[L.PROMPTS] == 32
    judge = read["iter-01/judge"][0]
    assert judge.ledger[L.PAIRS_JUDGED] == judge.counts[contract.ManifestKeys.PAIRS]
    train = read["iter-01/train"][0]
    steps = [json.loads(line) for line in (root / "iter-01/train/train_log.jsonl").read_text().splitlines()]
    assert train.ledger[L.PAIRS_TRAINED] == sum(r["samples"] for r in steps) > 0
    assert train.ledger[L.TOKENS_TRAINED] > train.ledger[L.PAIRS_TRAINED] * 2  # two sequences a pair
    assert read["iter-00/validate"][0].ledger[L.GOLD_LABELS] == 64  # 32 seed + 32 held-out pairs
    # the model a stage loads from the run's storage, and what it publishes there, are its storage traffic
    model_bytes = sum(f.stat().st_size for f in (root / "iter-00/seed-train/model").iterdir())
    assert gen.ledger[L.BYTES_READ] >= model_bytes
    assert train.ledger[L.BYTES_WRITTEN] >= sum(f["bytes"] for f in train.files.values())
    report = json.loads((root / "report.json").read_text())["cost"]
    for it in (0, 1, 2):
        stages = [m for d, ms in read.items() if d.startswith(f"iter-{it:02d}/") for m in ms]
        row = next(r for r in report["iterations"] if r["iteration"] == it)
        assert row["ledger"][L.CPU_SECONDS] == pytest.approx(sum(m.ledger[L.CPU_SECONDS] for m in stages), rel=1e-5)
    assert report["total"][L.TOKENS_GENERATED] == sum(m.ledger.get(L.TOKENS_GENERATED, 0)
                                                       for ms in read.values() for m in ms)
    assert "## Cost" in (root / "report.md").read_text() and "cost (~: estimated)" in stdout
    lines = [ln for ln in stdout.splitlines() if ": done in " in ln]
    assert "time left unknown" in lines[0] and "iter-01/train" in next(ln for ln in lines if "left)" in ln
                                                                       and "about" in ln)
    assert lines[-1].endswith("(run 100% done, about 0s left)")


def _write_run(tmp_path: Path, tiny: dict[str, str], **data_overrides: str) -> Path:
    doc = {
        "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "e2e", "namespace": "ns"},
        "spec": {
            "model": {"sft": tiny["model"]},
            "data": {"seed": tiny["seed"], "prompts": tiny["prompts"], **data_overrides},
            "iterations": {"count": 1, "promptsPerIteration": 16},
            "generation": {"maxNewTokens": 12, "backend": "transformers", "shards": 2},
            "training": {"learningRate": 1e-4, "seedEpochs": 1, "batchSize": 8, "maxLength": 128,
                         "maxPromptLength": 64},
            "maxRetriesPerStage": 1,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_plan_lists_every_stage_with_inputs_and_outputs(tmp_path, tiny):
    run = _write_run(tmp_path, tiny)
    proc = spa("plan", str(run), "--storage", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    for key in ("iter-00/seed-train", "iter-01/generate", "iter-01/judge", "iter-01/train"):
        assert key in proc.stdout
    assert "spa-worker generate" in proc.stdout and "--slice-end 16" in proc.stdout


def test_run_with_two_training_processes(tmp_path, tiny):
    """`spa run --processes 2`: the train stages launch two processes, sharded (auto: fsdp for full-parameter)."""
    doc = yaml.safe_load(_write_run(tmp_path, tiny).read_text())
    doc["spec"]["iterations"] = {"count": 0}
    run = tmp_path / "run0.yaml"
    run.write_text(yaml.safe_dump(doc))
    proc = spa("run", str(run), "--storage", str(tmp_path / "store"), "--processes", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    seed = tmp_path / "store" / "ns" / "e2e" / "iter-00" / "seed-train"
    manifest = contract.StageManifest.from_json((seed / contract.MANIFEST).read_text())
    assert manifest.counts[contract.ManifestKeys.PROCESSES] == 2
    assert manifest.counts[contract.ManifestKeys.EFFECTIVE_BATCH] == 8
    assert manifest.args[manifest.args.index("--strategy") + 1] == "fsdp"
    log = next((tmp_path / "store" / "ns" / "e2e" / "logs").glob("iter-00-seed-train-a1*.log")).read_text()
    assert "DTensor shards" in log  # each rank checked that its parameters really are sharded
    assert "seed-train: ledger:" in log and "over 2 process(es)" in log  # both ranks' CPU time and traffic counted
    assert manifest.ledger[contract.Ledger.PAIRS_TRAINED] == 32  # the seed's 32 pairs, gathered over both ranks


def test_run_on_s3_storage(tmp_path, tiny, s3_env):
    """The whole loop with every artifact in S3 (moto server): models are read back from S3 by URI."""
    run = _write_run(tmp_path, tiny)
    root_uri = f"s3://{s3_env['BUCKET']}/runs"
    proc = spa("run", str(run), "--storage", root_uri, "--logs", str(tmp_path / "logs"),
               env={**s3_env, "SPA_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    root = f"{root_uri}/ns/e2e"
    for d in ("iter-00/seed-train", "iter-01/train"):
        assert storage.exists(f"{root}/{d}/{contract.MANIFEST}")
    for d in ("iter-01/generate", "iter-01/judge"):
        assert len(contract.finished_shard_dirs(f"{root}/{d}")) == 2 if d.endswith("generate") else 1
    files = storage.list_files(f"{root}/iter-01/train/model")
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    # The ledger's storage traffic on S3: π_0 downloaded once (by the first generate shard; the second found it
    # in the cache), the trained model uploaded.
    gen = [contract.read_manifest(d) for d in contract.finished_shard_dirs(f"{root}/iter-01/generate")]
    seed_model = sum(len(storage.read_bytes(f"{root}/iter-00/seed-train/model/{f}"))
                     for f in storage.list_files(f"{root}/iter-00/seed-train/model"))
    L = contract.Ledger
    assert gen[0].ledger[L.BYTES_READ] >= seed_model > gen[1].ledger[L.BYTES_READ]
    train = contract.read_manifest(f"{root}/iter-01/train")
    assert train.ledger[L.BYTES_WRITTEN] >= sum(f["bytes"] for f in train.files.values())
    # π_0 was fetched from S3 into the cache, once.
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len([p for p in cached if p.is_dir()]) == 1, cached  # beside it only its download lock
    assert all(p.is_dir() or p.suffix == ".lock" for p in cached), cached


def test_bad_seed_row_fails_the_run_once_with_the_row_named(tmp_path, tiny):
    bad = tmp_path / "seed.jsonl"
    rows = Path(tiny["seed"]).read_text().splitlines()
    rows[2] = '{"prompt": "x", "chosen": '
    bad.write_text("\n".join(rows) + "\n")
    run = _write_run(tmp_path, tiny, seed=str(bad))
    proc = spa("run", str(run), "--storage", str(tmp_path / "store"))
    assert proc.returncode == 2  # bad input
    assert f"{bad}: row 3: not valid JSON" in proc.stdout
    logs = [p.name for p in (tmp_path / "store" / "ns" / "e2e" / "logs").iterdir() if p.name != warm.SERVER_LOG]
    assert logs == ["iter-00-validate-a1.log"]  # caught before training, and not retried
    assert not (tmp_path / "store" / "ns" / "e2e" / "iter-00" / "seed-train" / contract.MANIFEST).exists()


def test_invalid_manifest_is_one_line_naming_the_field(tmp_path, tiny):
    run = _write_run(tmp_path, tiny)
    doc = yaml.safe_load(run.read_text())
    doc["spec"]["training"]["beta"] = -1
    run.write_text(yaml.safe_dump(doc))
    proc = spa("run", str(run), "--storage", str(tmp_path / "store"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"spa: invalid AlignmentRun: {run}: spec.training.beta: Input should be greater than 0"]
