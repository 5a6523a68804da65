"""train / seed-train on the tiny model: a real TRL step, the CLI contract, resume, and 2-process DP."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from by_hand import quantile
from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys, TrainArgs
from spa_workers.data import write_jsonl
from workerproc import run_worker

pytestmark = pytest.mark.slow

# Small, quick settings shared by the runs that are compared with each other.
COMMON = ["--batch-size", "4", "--learning-rate", "1e-3", "--max-length", "64", "--seed", "0"]
SPA = [
    "--extrapolation",
    "0.5",
    "--window",
    "16",
    "--low-confidence-fraction",
    "0.25",
    "--warmup-fraction",
    "0.25",
    "--checkpoint-every-steps",
    "2",
    "--max-prompt-length",
    "40",
]


def _pair(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return (
        f"What is {a} plus {b}?",
        f"The answer is {a + b}.",
        f"The answer is {a + b + rng.choice([-2, 1, 10])}.",
    )


def read_log(stage_dir: str) -> list[dict]:
    return [
        json.loads(line)
        for line in storage.read_text(storage.join(stage_dir, "train_log.jsonl")).splitlines()
    ]


def manifest(stage_dir: str) -> dict:
    return json.loads(storage.read_text(storage.join(stage_dir, contract.MANIFEST)))


def state_dict(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, str]:
    """A gold file (flat strings) and a judge-style stage dir (2 finished shards, messages + rewards, and one
    over-long prompt)."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(7)
    gold = [dict(zip(("prompt", "chosen", "rejected"), _pair(rng), strict=True)) for _ in range(8)]
    write_jsonl(str(root / "gold.jsonl"), gold)
    judged = []
    for _ in range(16):
        q, c, r = _pair(rng)
        judged.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": c,
                "rejected": r,
                "chosen_reward": 0.3,
                "rejected_reward": -0.1,
                "confidence": 0.6,
            }
        )
    long_prompt = " ".join(["What is one plus one?"] * 30)
    judged.insert(5, {"prompt": [{"role": "user", "content": long_prompt}], "chosen": "2", "rejected": "3"})
    judge = root / "judge"
    for i, rows in enumerate((judged[:9], judged[9:])):
        shard = Path(contract.shard_dir(str(judge), i, 2))
        write_jsonl(str(shard / contract.PAIRS_FILE), rows)
        (shard / contract.MANIFEST).write_text(contract.StageManifest(stage=contract.JUDGE, files={}).to_json())
    return {"gold": str(root / "gold.jsonl"), "judge": str(judge)}


@pytest.fixture(scope="module")
def trained(tiny, pairs, tmp_path_factory) -> dict:
    """seed-train then train through the real CLI (each once; several tests read the results)."""

    root = tmp_path_factory.mktemp("stages")
    seed_out, it_out = str(root / "seed"), str(root / "iter1")
    seed_argv = ["seed-train", "--model", tiny["model"], "--pairs", pairs["gold"], "--epochs", "2", *COMMON]
    seed = run_worker(*seed_argv, "--output", seed_out)
    assert seed.returncode == 0, seed.stderr[-3000:]
    train_argv = [
        "train",
        "--model",
        os.path.join(seed_out, contract.MODEL_SUBDIR),
        "--pairs",
        pairs["judge"],
        *COMMON,
        *SPA,
    ]
    it = run_worker(*train_argv, "--output", it_out)
    assert it.returncode == 0, it.stderr[-3000:]
    return {"seed": seed_out, "iter": it_out, "seed_argv": seed_argv, "train_argv": train_argv, "seed_proc": seed,
            "iter_proc": it}


# --- (a) one real TRL step
# -----------------------------------------------------------------------------------------


def test_one_trl_step_changes_the_weights_and_lowers_the_batch_loss(tiny, tiny_policy, pairs, tmp_path):
    import torch
    from spa_workers.data import load_pairs
    from spa_workers.modeling import load_tokenizer
    from spa_workers.train import Refinement, make_trainer, training_rows

    args = TrainArgs(
        model=tiny_policy,
        reference=tiny["model"],
        pairs=pairs["gold"],
        output=str(tmp_path),
        batch_size=8,
        learning_rate=5e-3,
        max_length=64,
    )
    rows, skipped = training_rows(load_pairs(pairs["gold"]), load_tokenizer(tiny_policy), 1024)
    assert len(rows) == 8 and skipped == 0
    refinement = Refinement(
        low_confidence_fraction=0.5, smoothing=0.2, warmup_fraction=0.0, window=16, extrapolation=0.5
    )
    trainer = make_trainer(args, rows, str(tmp_path / "scratch"), refinement=refinement, max_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])  # the whole dataset

    def batch_loss(window: list[float]) -> tuple[float, list[float]]:
        trainer.window.load_state_dict({"values": window})  # the same window each time: the same threshold
        trainer.model.train()
        with torch.no_grad():
            loss = float(trainer.compute_loss(trainer.model, batch))
        scores = trainer._micro[0]["scores"].tolist()
        trainer._micro.clear()
        return loss, scores

    _, scores = batch_loss([])  # the batch's own β·m̃ (an empty window: no threshold)
    before_params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    before, _ = batch_loss(scores)  # against a window of them: half the batch is low-confidence
    trainer.window.load_state_dict({"values": scores})
    trainer.train()  # max_steps=1, batch 8 = every row: the step's batch is this batch, and this its window
    after, _ = batch_loss(scores)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before_params[n])]
    assert changed, "the optimiser step changed no weight"
    assert after < before - 1e-4
    (step,) = trainer.step_log
    assert step["step"] == 1 and step["samples"] == 8
    assert step["loss"] == pytest.approx(before, abs=1e-5)  # the step trained on exactly this loss
    assert step["alpha"] == 0.2 and step["refined_fraction"] == 0.5


def test_extrapolated_logps_equal_full_logits_computation(tiny, tiny_policy, pairs, tmp_path):
    """The chunked no-grad λ path on a real model = log-softmax of (1+λ)h_θ − λh_ref from full logits; its
    reference
    log-probs = TRL's `compute_ref_log_probs`; λ = 0 gives the policy's own (TRL fused-head) log-probs."""
    import torch
    from spa_workers.data import load_pairs
    from spa_workers.modeling import load_model, load_tokenizer
    from spa_workers.train import make_trainer, training_rows

    args = TrainArgs(
        model=tiny_policy,
        reference=tiny["model"],
        pairs=pairs["gold"],
        output=str(tmp_path),
        batch_size=4,
        max_length=64,
    )
    rows, _ = training_rows(load_pairs(pairs["gold"])[:4], load_tokenizer(tiny_policy), 1024)
    trainer = make_trainer(args, rows, str(tmp_path / "scratch"), refinement=None)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    lam = 0.5
    ref_lp, ext_lp = trainer.extrapolated_logps(trainer.model, kwargs, labels, lam)

    policy, ref = load_model(tiny_policy), load_model(tiny["model"])  # fresh, unpatched copies
    with torch.no_grad():
        hp = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        hr = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tgt = labels[:, 1:]
    mask = tgt != -100

    def summed(logits):
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(1)

    assert torch.allclose(ext_lp, summed((1 + lam) * hp - lam * hr), atol=1e-4)
    assert torch.allclose(ref_lp, summed(hr), atol=1e-4)
    trl_ref_chosen, trl_ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    assert torch.allclose(ref_lp, torch.cat([trl_ref_chosen, trl_ref_rejected]).float(), atol=1e-4)
    _, ext0 = trainer.extrapolated_logps(trainer.model, kwargs, labels, 0.0)
    with torch.no_grad():
        fused = trainer.model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    assert torch.allclose(ext0, fused.float(), atol=1e-4)
    assert not torch.allclose(ext_lp, ext0, atol=1e-3)  # λ matters


def test_lora_reference_is_the_model_with_its_adapter_off(tiny, tiny_policy, pairs, tmp_path):
    import torch
    from spa_workers.data import load_pairs
    from spa_workers.modeling import load_model, load_tokenizer
    from spa_workers.train import Refinement, make_trainer, training_rows

    args = TrainArgs(
        model=tiny_policy, pairs=pairs["gold"], output=str(tmp_path), batch_size=4, max_length=64, lora_r=4
    )
    rows, _ = training_rows(load_pairs(pairs["gold"])[:4], load_tokenizer(tiny_policy), 1024)
    trainer = make_trainer(args, rows, str(tmp_path / "scratch"), refinement=Refinement(extrapolation=0.5))
    assert trainer.ref_model is None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so policy != base
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ref_lp, ext_lp = trainer.extrapolated_logps(trainer.model, kwargs, labels, 0.0)
    base = load_model(tiny_policy)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tgt = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ref_lp, (lp * (tgt != -100)).sum(1), atol=1e-4)
    assert not torch.allclose(ref_lp, ext_lp, atol=1e-2)  # the adapter is on for the policy


# --- (b) the CLI contract
# ------------------------------------------------------------------------------------------


def test_seed_train_and_train_through_the_cli(trained, tiny):
    import torch
    from transformers import AutoModelForCausalLM

    seed_m, it_m = manifest(trained["seed"]), manifest(trained["iter"])
    for stage_dir, m in ((trained["seed"], seed_m), (trained["iter"], it_m)):
        assert {
            "model/model.safetensors",
            "model/config.json",
            "model/tokenizer.json",
            "train_log.jsonl",
        } <= set(m["files"])
        assert not any(f.startswith(contract.CHECKPOINT_SUBDIR) or "/.trainer" in f for f in m["files"])
        assert not os.path.exists(
            os.path.join(stage_dir, contract.CHECKPOINT_SUBDIR)
        )  # removed after manifest
        model = AutoModelForCausalLM.from_pretrained(os.path.join(stage_dir, "model"))
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
        for key in (
            ManifestKeys.LOSS,
            ManifestKeys.REWARD_ACCURACY,
            ManifestKeys.MARGIN,
            ManifestKeys.STEPS,
            ManifestKeys.SAMPLES_PER_S,
            ManifestKeys.REFINED_FRACTION,
        ):
            assert math.isfinite(m["metrics"][key])
    # the seed model moved away from the SFT model
    sft, seed = state_dict(tiny["model"]), state_dict(os.path.join(trained["seed"], "model"))
    assert any(not torch.equal(sft[k], seed[k]) for k in sft)
    # seed-train: plain DPO (8 gold pairs, 2 epochs, batch 4 → 4 steps), no refinement
    seed_log = read_log(trained["seed"])
    assert [r["step"] for r in seed_log] == [1, 2, 3, 4] and seed_m["metrics"][ManifestKeys.STEPS] == 4
    assert all(r["threshold"] is None and r["refined_fraction"] == 0 for r in seed_log)
    assert ManifestKeys.THRESHOLD not in seed_m["metrics"]
    # train: 17 judged pairs, one with a too-long prompt skipped; refinement after the 25% warm-up
    assert it_m["counts"][ManifestKeys.PAIRS] == 16 and it_m["counts"]["skipped_long_prompt"] == 1
    it_log = read_log(trained["iter"])
    assert [r["step"] for r in it_log] == [1, 2, 3, 4]
    assert [r["alpha"] for r in it_log] == [0.0, 0.1, 0.1, 0.1]
    assert all(len(r["scores"]) == 4 for r in it_log)
    assert it_log[0]["threshold"] is None and all(r["threshold"] is not None for r in it_log[1:])  # empty at first
    assert it_m["metrics"][ManifestKeys.REFINED_FRACTION] > 0
    assert it_m["metrics"][ManifestKeys.THRESHOLD] == it_log[-1]["threshold"]
    assert all(r["lr"] > 0 for r in it_log)
    progress = json.loads(Path(trained["iter"], contract.PROGRESS).read_text())
    assert progress["unit"] == "steps" and progress["done"] == progress["total"] == 4


def test_second_run_is_a_no_op(trained, worker):
    for stage, stage_dir in (("seed-train", trained["seed"]), ("train", trained["iter"])):
        before = Path(stage_dir, contract.MANIFEST).read_bytes()
        argv = trained["train_argv"] if stage == "train" else trained["seed_argv"]  # the same command again
        proc = worker(*argv, "--output", stage_dir)
        assert proc.returncode == 0, proc.stderr
        assert "already has a manifest" in proc.stderr
        assert Path(stage_dir, contract.MANIFEST).read_bytes() == before


def test_bad_pairs_input_is_one_clear_line(tiny, worker, tmp_path):
    missing = str(tmp_path / "nothing-here")
    proc = worker("train", "--model", tiny["model"], "--pairs", missing, "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no shard output found" in proc.stderr.strip().splitlines()[-1]


# --- (c) resume
# ------------------------------------------------------------------------------------------------------


def _killed_then_resumed(worker, argv: list[str], output: str, env: dict[str, str] | None = None):
    killed = worker(*argv, "--output", output, env={**(env or {}), "SPA_TRAIN_STOP_AFTER_STEPS": "2"})
    assert killed.returncode == 75, killed.stderr[-3000:]
    assert not storage.exists(storage.join(output, contract.MANIFEST))
    ckpt = storage.join(output, contract.CHECKPOINT_SUBDIR, "checkpoint-2")
    assert storage.exists(storage.join(ckpt, "_COMPLETE"))
    assert storage.exists(storage.join(ckpt, "optimizer.pt")) and storage.exists(
        storage.join(ckpt, "spa_state.json")
    )
    resumed = worker(*argv, "--output", output, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 2)" in resumed.stderr
    return resumed


def test_killed_run_resumes_from_its_checkpoint(trained, worker, tmp_path):
    import torch

    out = str(tmp_path / "iter1")
    resumed = _killed_then_resumed(worker, trained["train_argv"], out)
    m = manifest(out)
    assert m["counts"]["resumed_from_step"] == 2
    assert "step 1/" not in resumed.stderr and "step 3/4" in resumed.stderr  # steps 1-2 were not redone
    assert not os.path.exists(os.path.join(out, contract.CHECKPOINT_SUBDIR))
    # same result as the uninterrupted run: the margin window, optimizer, scheduler, RNG and data order came
    # back
    full, res = read_log(trained["iter"]), read_log(out)
    assert [r["step"] for r in res] == [1, 2, 3, 4]
    for a, b in zip(full, res, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert (a["threshold"] is None and b["threshold"] is None) or b["threshold"] == pytest.approx(
            a["threshold"], abs=1e-6)
        assert b["window_size"] == a["window_size"]
    w_full, w_res = state_dict(os.path.join(trained["iter"], "model")), state_dict(os.path.join(out, "model"))
    assert all(torch.allclose(w_full[k], w_res[k], atol=1e-6) for k in w_full)


def test_a_checkpoint_made_with_other_settings_is_set_aside_not_resumed(trained, worker, tmp_path):
    """Issue 19.2: a stage restarted with another learning rate resumed from the old one's checkpoint."""
    out = str(tmp_path / "iter1")
    argv = trained["train_argv"]
    stop = {"SPA_TRAIN_STOP_AFTER_STEPS": "2"}
    assert worker(*argv, "--output", out, env=stop).returncode == 75
    ckpt = Path(out, contract.CHECKPOINT_SUBDIR, "checkpoint-2")
    old = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert json.loads(old["_COMPLETE"])["fingerprint_of"]["args"]["learning_rate"] == 1e-3
    other = [*argv[:argv.index("--learning-rate") + 1], "2e-3", *argv[argv.index("--learning-rate") + 2:]]
    changed = worker(*other, "--output", out, env=stop)
    assert changed.returncode == 75, changed.stderr[-3000:]
    assert "resuming from" not in changed.stderr
    assert ("train: checkpoints made with other settings (learning_rate 0.001 -> 0.002): moved "
            f"{Path(out, contract.CHECKPOINT_SUBDIR)} aside to ") in changed.stderr
    (kept,) = Path(out, ".discarded").glob("*/checkpoints")  # its stage failed again: still there, whole
    assert {p.name: p.read_bytes() for p in (kept / "checkpoint-2").iterdir()} == old
    assert json.loads((ckpt / "_COMPLETE").read_text())["fingerprint_of"]["args"]["learning_rate"] == 2e-3
    resumed = worker(*other, "--output", out)  # its own checkpoint: resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt} (step 2)" in resumed.stderr
    m = manifest(out)
    assert m["counts"]["resumed_from_step"] == 2 and m["fingerprint_of"]["args"]["learning_rate"] == 2e-3
    assert not Path(out, ".discarded").exists()  # the stage succeeded: what it replaced is deleted now


def test_resume_with_s3_storage(trained, worker, s3_env):
    from spa_workers.modeling import load_model

    out = f"s3://{s3_env['BUCKET']}/run/iter-01/train"
    _killed_then_resumed(worker, trained["train_argv"], out, env=s3_env)
    assert manifest(out)["counts"]["resumed_from_step"] == 2
    assert storage.list_files(storage.join(out, contract.CHECKPOINT_SUBDIR)) == []
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert load_model(storage.join(out, contract.MODEL_SUBDIR)) is not None


# --- (d) two processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_shares_one_window(trained, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each rank trains on 2 of the 4 samples of a step, and
    the threshold is the quantile of a window holding both ranks' scores.

    accelerate 1.15's `--cpu` launcher starts several processes only through mpirun, so the test launches with
    `--multi_gpu` on this CUDA-less machine; the stage then selects CPU + gloo itself.
    """
    out = str(tmp_path / "dp")
    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "spa_workers.cli",
        *trained["train_argv"],
        "--output",
        out,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = manifest(out)
    assert m["counts"]["processes"] == 2 and m["counts"]["effective_batch_size"] == 4
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    window, history = 16, []
    for rec in log:
        assert rec["samples"] == 4 and len(rec["scores"]) == 4  # 2 per rank, gathered
        assert rec["window_size"] == min(window, len(history))  # 2 × per-process batch after step 1
        if history:
            assert rec["threshold"] == pytest.approx(quantile(history[-window:], 0.25), abs=1e-9)
            assert rec["rank_thresholds"] == [rec["threshold"]] * 2  # both ranks used this one threshold
        else:
            assert rec["threshold"] is None  # the first step: an empty window
        history += rec["scores"]
    assert log[1]["window_size"] == 4
    # and the run is the single-process run of the same effective batch
    for a, b in zip(read_log(trained["iter"]), log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert sorted(b["scores"]) == pytest.approx(sorted(a["scores"]), abs=1e-5)
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    assert not os.path.exists(os.path.join(out, contract.CHECKPOINT_SUBDIR))
