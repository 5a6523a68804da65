"""Multi-process training through the real entry point: `python -m spa_workers.cli train --processes 2` launches
itself under `accelerate launch` (2 CPU processes, gloo) with the strategy's configuration.

Each test checks that the engine really is active (FSDP: every parameter a DTensor shard on each rank), that
step 1 is exactly ln 2 (policy == reference on every rank), and that the result is the single-process result.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from spa_workers import contract, storage
from spa_workers.data import read_records, write_jsonl
from workerproc import run_worker

pytestmark = pytest.mark.slow

COMMON = ["--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "64", "--seed", "0"]
SPA = ["--extrapolation", "0.5", "--window", "16", "--low-confidence-fraction", "0.25", "--warmup-fraction", "0.25"]
LN2 = math.log(2)


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> list[str]:
    """train argv (no output): the tiny model, 8 gold pairs (2 steps of 4), λ = 0.5, a checkpoint every step."""
    root = tmp_path_factory.mktemp("dist")
    pairs = str(root / "pairs.jsonl")
    write_jsonl(pairs, read_records(tiny["seed"])[:8])
    return ["train", "--model", tiny["model"], "--pairs", pairs, *COMMON, *SPA, "--checkpoint-every-steps", "1"]


def read_log(stage_dir: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(stage_dir, "train_log.jsonl")).splitlines()]


def manifest(stage_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(stage_dir, contract.MANIFEST)))


def weights(stage_dir: str) -> dict:
    return load_file(os.path.join(stage_dir, "model", "model.safetensors"))


def argv_value(m: dict, flag: str) -> str:
    return m["args"][m["args"].index(flag) + 1]


def assert_fsdp_active(stderr: str) -> None:
    """Both ranks report every policy and reference parameter as a DTensor holding half the elements, and both
    models sharded per decoder layer (TRL alone would shard the reference at its root only: one unit)."""
    lines = re.findall(r"rank (\d): fsdp (policy|reference): (\d+)/(\d+) parameters are DTensor shards, "
                       r"(\d+)/(\d+) elements local, (\d+) FSDP units for (\d+) layers", stderr)
    assert {(r, m) for r, m, *_ in lines} == {(r, m) for r in "01" for m in ("policy", "reference")}, stderr[-3000:]
    for _, _, sharded, n, local, total, units, layers in lines:
        assert sharded == n and int(local) * 2 == int(total)
        assert int(units) > int(layers)  # one unit per decoder layer, plus the rest


def assert_weights_came_from_rank0(stderr: str, sft_dir: str) -> None:
    """CPU-RAM-efficient loading, the GPU path: rank 0 read the weights, rank 1 none; after sharding, the
    reference's (and the untrained policy's) shards on both ranks hold the SFT model's weights: their sums of squares
    add up to the SFT file's (a rank left with zeros, as TRL's own reference preparation leaves it, would not)."""
    assert "rank 0: loaded the weights" in stderr and "rank 1: loaded no weights" in stderr
    sft = sum(float(t.double().pow(2).sum()) for t in load_file(os.path.join(sft_dir, "model.safetensors")).values())
    for model in ("policy", "reference"):
        per_rank = dict(re.findall(rf"rank (\d): fsdp {model}: .*local sum of squares (\S+)", stderr))
        assert per_rank.keys() == {"0", "1"} and all(float(v) > 0 for v in per_rank.values())
        assert sum(float(v) for v in per_rank.values()) == pytest.approx(sft, rel=1e-6)


def assert_same_run(a_dir: str, b_dir: str, tol: float = 5e-5) -> None:
    for a, b in zip(read_log(a_dir), read_log(b_dir), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=tol)
        assert sorted(b["margins"]) == pytest.approx(sorted(a["margins"]), abs=tol)
    wa, wb = weights(a_dir), weights(b_dir)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < tol


@pytest.fixture(scope="module")
def single(base, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("single") / "train")
    proc = run_worker(*base, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp(base, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("fsdp") / "train")
    t0 = time.monotonic()
    proc = run_worker(*base, "--processes", "2", "--output", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "stderr": proc.stderr, "wall_s": time.monotonic() - t0}


def test_fsdp_two_processes_shard_and_match_one_process(fsdp, single, tiny):
    """auto → FSDP2 full-shard on CPU/gloo, really active, both models per layer, weights read by rank 0 only and
    received by rank 1; λ > 0 goes through the sharded models; the gathered model equals the single-process one."""
    assert "launching 2 processes" in fsdp["stderr"]
    assert_fsdp_active(fsdp["stderr"])
    assert_weights_came_from_rank0(fsdp["stderr"], tiny["model"])
    log = read_log(fsdp["out"])
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference on both ranks
    assert log[0]["samples"] == 4 and log[0]["threshold"] is None  # the first step has an empty window
    assert log[1]["threshold"] is not None and log[1]["rank_thresholds"] == [log[1]["threshold"]] * 2
    m = manifest(fsdp["out"])
    assert m["counts"][contract.ManifestKeys.PROCESSES] == 2
    assert m["counts"][contract.ManifestKeys.EFFECTIVE_BATCH] == 4
    assert argv_value(m, "--strategy") == "fsdp"
    assert "model/model.safetensors" in m["files"]
    assert not os.path.exists(os.path.join(fsdp["out"], contract.CHECKPOINT_SUBDIR))
    uploads = dict(re.findall(r"rank (\d): uploaded (\d+) checkpoint files", fsdp["stderr"]))
    assert uploads.keys() == {"0", "1"} and all(int(n) > 0 for n in uploads.values())  # both ranks uploaded
    assert_same_run(single, fsdp["out"])
    w, sft = weights(fsdp["out"]), load_file(os.path.join(tiny["model"], "model.safetensors"))
    assert any(float((w[k] - sft[k]).abs().max()) > 1e-4 for k in w)  # it trained
    assert all(v.dtype == sft[k].dtype for k, v in w.items())  # saved in the input's dtype


def test_lora_two_processes_run_ddp(base, worker, tmp_path):
    """LoRA → DDP (auto); the reference is the adapter-off model on both ranks; the merged model is saved.
    Checkpoints by time (a tiny interval: after step 1; rank 0's clock decides for both ranks)."""
    argv = [*base, "--lora-r", "4", "--checkpoint-every-steps", "0", "--checkpoint-every-minutes", "1e-6"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, extra in ((one, []), (two, ["--processes", "2"])):
        proc = worker(*argv, *extra, "--output", out)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "checkpoint 1 stored" in proc.stderr
    assert "DTensor" not in proc.stderr  # DDP keeps whole replicas
    m = manifest(two)
    assert argv_value(m, "--strategy") == "ddp" and m["counts"]["processes"] == 2
    assert read_log(two)[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert_same_run(one, two)
    assert not any("lora" in k for k in weights(two))


def test_killed_rank_fails_the_stage_and_the_rerun_resumes(base, fsdp, worker, tmp_path):
    """SIGKILL of rank 1 right after checkpoint 1: the launch exits non-zero promptly (no hang); the checkpoint
    holds one model and one optimiser shard per rank; a rerun with 4 processes resumes from it (DCP reshards 2 → 4)
    and ends where the uninterrupted run ended. Resuming it as one unsharded process is one clear error line."""
    out, scratch = str(tmp_path / "train"), tmp_path / "scratch"
    scratch.mkdir()
    env = {"SPA_SCRATCH_DIR": str(scratch)}
    argv = [*base, "--processes", "2", "--output", out]
    t0 = time.monotonic()
    killed = worker(*argv, env={**env, "SPA_TRAIN_STOP_AFTER_STEPS": "1", "SPA_TRAIN_STOP_RANK": "1"}, timeout=300)
    failed_after = time.monotonic() - t0
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "killing rank 1 after checkpoint 1" in killed.stderr
    assert failed_after < fsdp["wall_s"] + 60  # the survivor was stopped, not left waiting for its peer
    assert not storage.exists(storage.join(out, contract.MANIFEST))
    assert [p.name.endswith("-node0") for p in scratch.iterdir()] == [True]  # the local files went there
    ckpt = storage.join(out, contract.CHECKPOINT_SUBDIR, "checkpoint-1")
    files = storage.list_files(ckpt)
    assert "_COMPLETE" in files and "spa_state.json" in files
    for kind in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f for f in files if f.startswith(kind + "/") and f.endswith(".distcp")} == {
            f"{kind}/__0_0.distcp", f"{kind}/__1_0.distcp"}, files

    single = worker(*base, "--output", out, env=env)  # 1 process: no FSDP to load the shards into
    assert single.returncode == contract.EXIT_BAD_INPUT
    assert "written with --strategy fsdp" in single.stderr.strip().splitlines()[-1]

    resumed = worker(*base, "--processes", "4", "--output", out, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(step 1)" in resumed.stderr and "step 1/" not in resumed.stderr
    assert len(re.findall(r"rank \d: fsdp policy: (\d+)/\1 parameters are DTensor shards", resumed.stderr)) == 4
    assert manifest(out)["counts"]["resumed_from_step"] == 1
    assert manifest(out)["counts"]["processes"] == 4
    assert list(scratch.iterdir()) == []  # cleaned up
    assert_same_run(fsdp["out"], out, tol=1e-6)


def test_two_nodes_meet_at_the_rendezvous_and_train_one_model(base, fsdp, tmp_path):
    """Two "pods" of one process each (JOB_COMPLETION_INDEX 0 and 1, rendezvous at SPA_RENDEZVOUS_HOST:PORT as a
    multi-node Job sets them) train one model together: the 2-process run's model, bit for bit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "train")
    env = {**os.environ, "SPA_RENDEZVOUS_HOST": "127.0.0.1", "SPA_RENDEZVOUS_PORT": str(port)}
    pods = [
        subprocess.Popen(
            [sys.executable, "-m", "spa_workers.cli", *base, "--nodes", "2", "--output", out],
            env={**env, "JOB_COMPLETION_INDEX": str(index)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for index in (1, 0)
    ]
    errs = [p.communicate(timeout=600)[1] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], errs[1][-3000:] + errs[0][-3000:]
    assert "rank 1: fsdp policy" in errs[0] and "rank 0: fsdp policy" in errs[1]  # one rank per pod
    assert manifest(out)["counts"]["processes"] == 2
    assert_same_run(fsdp["out"], out, tol=1e-7)
