"""benchmarks/gpu_train.py, the GPU check, on CPU at its tiny size: the same steps as on the GPU (model and pairs built
offline, `spa-worker train --strategy fsdp` stopped after its checkpoint, resumed, finished), with 2 gloo processes
standing in for the GPUs, so the prepared command still works when a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_installed_versions_are_checked_and_a_mismatch_is_named():
    gpu_train = _module()
    assert gpu_train.version_problems(gpu_train.REQUIRED) == []  # this environment is what the check expects
    (problem,) = gpu_train.version_problems({"torch": ">=99", "accelerate": ">=1.0"})
    assert problem.startswith("torch ") and problem.endswith("needs torch>=99")
    assert gpu_train.version_problems({"no-such-package-xyz": ">=1"}) == [
        "no-such-package-xyz is not installed; needs no-such-package-xyz>=1"]


def test_mistral_shape_at_1b():
    gpu_train = _module()
    s = gpu_train.SIZES["1b"]
    head_dim = s.hidden // s.heads
    attn = s.hidden * head_dim * (2 * s.heads + 2 * s.kv_heads)
    total = s.layers * (attn + 3 * s.hidden * s.intermediate) + 2 * s.vocab * s.hidden
    assert 0.95e9 < total < 1.05e9 and s.vocab == 32000 and s.kv_heads < s.heads and head_dim == 128


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_at_tiny_size(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_train.json").read_text())
    assert r["processes"] == 2 and r["strategy"] == "fsdp" and r["gpus"] == 0
    assert r["steps"] == 4 and r["resumed_from_step"] == 2  # stopped after checkpoint 2, resumed, finished
    assert len(r["step_times_s"]) == 2 and r["steady_step_s"] > 0 and r["tokens_per_s"] > 0
    assert r["mfu"] is None and r["gpu_peak_allocated_gib"] is None  # no GPU here
    assert len(r["host_peak_gib_per_rank"]) == 2 and all(h > 0 for h in r["host_peak_gib_per_rank"])
    assert r["checkpoint_save_s"] > 0 and r["final_save_s"] > 0
    assert r["first_step_fresh_s"] > 0 and r["first_step_resumed_s"] > 0
    assert r["model"]["kv_heads"] < r["model"]["heads"]  # grouped-query attention, as Mistral
    a_log = (tmp_path / "gpu_train-a.log").read_text()
    assert len(re.findall(r"rank \d: fsdp policy: (\d+)/\1 parameters are DTensor shards", a_log)) == 2
    text = (tmp_path / "gpu_train.md").read_text()
    assert "| tokens/s |" in text and "| MFU at 10·N FLOPs/token |" in text
