"""ZeRO-3 initialisation at load time: under `accelerate launch --use_deepspeed --zero3_init_flag true` the train
stage must build its training arguments before it loads the models, because building them is what makes the
DeepSpeed config live for `from_pretrained` (accelerate's DeepSpeedPlugin sets transformers' HfDeepSpeedConfig);
loaded before, every rank would hold both whole models.

What runs here: the stage's own `make_trainer` in a process with the environment `accelerate launch` gives a
DeepSpeed ZeRO-3 rank, and DeepSpeed's real `zero.Init` on CPU; only the trainer class is replaced by one that keeps
what it is given (DeepSpeed training itself needs a GPU: accelerate refuses it on CPU). Needs the `deepspeed`
package (CPU build: `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed`); skipped without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# scripts/install.sh installs it; CI (SPA_REQUIRE_TOOLS) fails rather than passing by skipping
MISSING = importlib.util.find_spec("deepspeed") is None
pytestmark = pytest.mark.skipif(MISSING and not os.environ.get("SPA_REQUIRE_TOOLS"),
                                reason="deepspeed is not installed (scripts/install.sh installs it)")

SCRIPT = r"""
import json, sys
from spa_workers import spa_trainer
from spa_workers.contract import TrainArgs

class Kept:  # stands in for SPATrainer: keeps what make_trainer hands it
    def __init__(self, **kw):
        self.kw = kw
    def add_callback(self, cb):
        pass
    def remove_callback(self, cb):
        pass

spa_trainer.trainer_class = lambda: Kept
args = TrainArgs(model=sys.argv[1], pairs="unused", output=sys.argv[2], batch_size=4)
rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}]
kept = spa_trainer.make_trainer(args, rows, sys.argv[2], refinement=None, processes=2).kw
report = {name: [hasattr(p, "ds_id") for p in kept[name].parameters()] for name in ("model", "ref_model")}
report["zero_stage"] = kept["args"].deepspeed_plugin.zero_stage
print("REPORT " + json.dumps(report))
"""


def test_models_are_created_zero3_partitioned_by_the_train_stage(tiny, tmp_path):
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "ACCELERATE_MIXED_PRECISION": "no",
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517",
    }
    proc = subprocess.run([sys.executable, "-c", SCRIPT, tiny["model"], str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env}, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["zero_stage"] == 3
    for name in ("model", "ref_model"):
        assert report[name] and all(report[name]), f"{name}: not created ZeRO-3-partitioned"
    assert "ZeRO-3 init: policy and reference loaded partitioned" in proc.stderr
