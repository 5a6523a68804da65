"""Issue 5's quality gate: `benchmarks/quality.py --quick` (seed 0, every model trained by `spa run`) must show SPA
after 2 iterations beating DPO on the seed alone on gold win-rate by more than the seed-to-seed spread that
`quality.py --full` measured (benchmarks/results/quality-spread.json). A sign error in the judge or a wrong mask in
the loss shows up here when the unit tests miss it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPREAD = ROOT / "benchmarks" / "results" / "quality-spread.json"


def test_spa_after_two_iterations_beats_dpo_on_the_seed_by_more_than_the_spread(tmp_path):
    spread = json.loads(SPREAD.read_text())["spread"]
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--fresh",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    summary = data["summary"]
    # the README table's cost columns, from the runs' ledgers: SPA's model after 2 iterations cost more compute than
    # DPO on the seed (which it builds on) and read the same gold labels
    conds = data["per_seed"]["0"]["conditions"]
    dpo_cost, spa_cost = conds["dpo-seed"]["0"]["cost"]["ledger"], conds["spa"]["2"]["cost"]["ledger"]
    assert spa_cost["gold_labels"] == dpo_cost["gold_labels"] == data["per_seed"]["0"]["info"]["seed_pairs"]
    assert spa_cost["cpu_seconds"] > conds["spa"]["1"]["cost"]["ledger"]["cpu_seconds"] > dpo_cost["cpu_seconds"] > 0
    spa2, dpo = summary["spa_iter2_win_rate"], summary["dpo_seed_win_rate"]
    gain = spa2 - dpo
    assert gain > spread, (f"SPA after 2 iterations {spa2:.3f} vs DPO on the seed {dpo:.3f}: gain {gain:+.3f} is not "
                           f"above the seed-to-seed spread {spread:.3f} measured by --full")
