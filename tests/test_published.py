"""One published model (issue 19.3): the planner's gate verdict names it, and `spa run`'s console, report.md,
report.json and the run's PUBLISHED.json all say the same model and why; the results table at 80 columns.

The stages are finished in-process by `runner.run_stage` (the worker's own contract: real fingerprints, real
manifests) with bodies that write scripted figures instead of training, so `spa run` finds them done and only plans:
a run of seconds, not of minutes. What is under test is the CLI's reading of the planner, not the stages."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spa_operator.cli import _load
from spa_operator.planner import PUBLISHED_FILE, model_uri, stage_graph
from spa_workers import contract
from spa_workers.contract import ManifestKeys as K
from spa_workers.runner import run_stage
from test_cli import edit, spa, write_run


def finish(run_yaml: Path, agreement: list[float], until: str | None = None) -> str:
    """Finish the run's stages in order (up to and including `until`); iteration i's evaluate reports held-out
    agreement agreement[i] over 400 pairs. Returns the run root."""
    run, root = _load(str(run_yaml), None)
    for stage in stage_graph(run.spec, root):
        def body(work, stage=stage) -> None:
            if stage.stage in (contract.TRAIN, contract.SEED_TRAIN):
                os.makedirs(os.path.join(work.dir, contract.MODEL_SUBDIR))
                Path(work.dir, contract.MODEL_SUBDIR, "config.json").write_text("{}")
                work.metrics.update({K.LOSS: 0.6, K.REWARD_ACCURACY: 0.7, K.REFINED_FRACTION: 0.0938})
                work.counts[K.PAIRS] = 16
            elif stage.stage == contract.EVALUATE:
                p = agreement[stage.iteration]
                work.counts[K.PAIRS] = 400
                work.metrics.update({K.HELDOUT_AGREEMENT: p, K.HELDOUT_AGREEMENT_SE: (p * (1 - p) / 400) ** 0.5})
            elif stage.stage == contract.GENERATE:
                work.counts.update({K.RESPONSES: 32, K.GENERATED_TOKENS: 32 * 12})
            elif stage.stage == contract.JUDGE:
                work.counts[K.PAIRS] = 16
                work.metrics[K.REWARD_GAP] = 0.1234
        assert run_stage(stage.args, body) == 0
        if stage.key == until:
            break
    return root


def published(root: str) -> tuple[dict, dict, str]:
    return (json.loads(Path(root, PUBLISHED_FILE).read_text()), json.loads(Path(root, "report.json").read_text()),
            Path(root, "report.md").read_text())


def assert_one_story(proc, root: str, iteration: int, reason: str, stopped: bool = False) -> None:
    """Console, PUBLISHED.json, report.json and report.md name the same model, iteration and reason."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = model_uri(root, iteration)
    marker, report, markdown = published(root)
    assert marker == {"model": model, "iteration": iteration, "reason": reason,
                      "stoppedByGate": stopped}
    assert report["final_model"] == model and report["published"] == marker
    assert f"Published model (iteration {iteration}): `{model}`. Why: {reason}." in markdown
    lines = proc.stdout.splitlines()
    assert reason in lines and f"final model: {model}" in lines, proc.stdout
    assert f"published: iteration {iteration}, {root}/{PUBLISHED_FILE}" in lines


def test_a_gate_that_stops_early_publishes_one_model_everywhere(tmp_path, tiny):
    """Iteration 2's agreement falls 0.95 -> 0.70 (far beyond maxDrop 0.1 and its standard errors): the gate stops
    there. The saved report used to say "The run has not finished" with `"final_model": null`."""
    run = write_run(tmp_path, tiny, count=3, heldout=True, gate={"metric": "heldoutAgreement", "maxDrop": 0.1})
    root = finish(run, [0.9, 0.95, 0.70, 0.9], until="iter-02/evaluate")
    proc = spa("run", str(run))
    reason = ("gate: heldoutAgreement 0.7 at iteration 2 dropped 0.25 below best iteration 1 (0.95): more than "
              "maxDrop 0.1 and 2.6 standard errors of the difference (0.066)")
    assert_one_story(proc, root, 1, reason, stopped=True)
    assert not Path(root, "iter-03").exists()


def test_a_gate_that_holds_and_a_gate_added_to_a_finished_run(tmp_path, tiny):
    """Without a gate and with one that holds, the last iteration's model; a gate added to the finished run stops it
    at iteration 2 and publishes iteration 1's model (report.json used to name the rejected last model)."""
    run = write_run(tmp_path, tiny, count=3, heldout=True)
    root = finish(run, [0.9, 0.95, 0.70, 0.9])
    assert_one_story(spa("run", str(run)), root, 3, "no quality gate: the last iteration's model is published")
    edit(run, lambda s: s.update(gate={"metric": "heldoutAgreement", "floor": 0.5}))
    assert_one_story(spa("run", str(run)), root, 3, "gate: heldoutAgreement held; best iteration 1 (0.95); the last "
                                                    "iteration's model is published")
    edit(run, lambda s: s.update(gate={"metric": "heldoutAgreement", "maxDrop": 0.1}))
    proc = spa("run", str(run))
    assert_one_story(proc, root, 1, "gate: heldoutAgreement 0.7 at iteration 2 dropped 0.25 below best iteration 1 "
                                    "(0.95): more than maxDrop 0.1 and 2.6 standard errors of the difference (0.066)",
                     stopped=True)
    # `spa report` reads the same verdict from storage
    again = spa("report", root)
    assert again.returncode == 0 and published(root)[0]["iteration"] == 1


def test_results_table_keeps_numbers_whole_at_80_columns(tmp_path, tiny):
    """At 80 columns rich folded the 10-column table's numbers across lines ("0.81" / "25"); now a table too wide is
    printed in parts, each repeating the iteration column, and every figure stays on one line."""
    run = write_run(tmp_path, tiny, count=2, heldout=True)
    finish(run, [0.8125, 0.875, 0.8438])
    proc = spa("report", str(run), env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    results = proc.stdout.split(": cost (~: estimated)")[0]  # the cost table follows, with the same iterations
    table = [ln for ln in results.splitlines() if ln.startswith(("│", "┃", "┏", "└"))]
    assert table and max(len(ln) for ln in table) <= 80
    cells = [c.strip() for ln in table if ln.startswith("│") for c in ln.strip("│").split("│")]
    for figure in ("0.8125", "0.8750", "0.8438", "0.1234", "0.0938", "0.6000", "0.7000", "12.0"):
        assert figure in cells, (figure, proc.stdout)
    assert "(1/2)" in proc.stdout and [c for c in cells if c in ("seed", "1", "2")].count("seed") == 2


def test_lc_figures_say_whether_they_compare_with_the_leaderboard(tmp_path, tiny):
    """Every LC figure but alpaca_eval's length_controlled_v1 on AlpacaEval's 805 instructions is labelled "LC
    (minimal GLM), not comparable with the leaderboard"; alpacaEvalV1 needs all 805 (spec validation)."""
    from spa_operator.spec import SpecError, load_run
    from spa_operator.summary import lc_label

    judge = {"endpoint": "http://judge:8000/v1", "model": "j"}
    run = write_run(tmp_path, tiny, evaluation={"winRate": {"prompts": tiny["prompts"], "judge": judge}})
    assert lc_label(load_run(run)) == "LC win rate: LC (minimal GLM), not comparable with the leaderboard"
    edit(run, lambda s: s["evaluation"]["winRate"].update(lengthControl="alpacaEvalV1"))
    assert lc_label(load_run(run)).startswith("LC win rate: alpaca_eval's length_controlled_v1 (the AlpacaEval 2.0 "
                                              "leaderboard's GLM) on its 805 instructions")
    edit(run, lambda s: s["evaluation"]["winRate"].update(samples=100))
    try:
        load_run(run)
    except SpecError as e:
        assert str(e).endswith("spec.evaluation.winRate: lengthControl alpacaEvalV1 needs all 805 AlpacaEval "
                               "instructions: samples must be 0 or 805"), str(e)
    else:
        raise AssertionError("samples 100 with alpacaEvalV1 was accepted")
