"""benchmarks/gpu_train.py, the GPU check, smoke-tested on CPU at its tiny size so it still runs when a GPU is there:
it builds its model and data offline, runs the real train stage and reports throughput."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_at_tiny_size(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_train.json").read_text())
    (result,) = report["results"]  # no GPU: the single-process variant only
    assert result["steps"] == 2 and result["effective_batch"] == 4 and result["tokens_per_s"] > 0
    assert result["mfu"] is None and report["tokens_per_pair"] > 0
    assert "| 1-process | 1 |" in (tmp_path / "gpu_train.md").read_text()
