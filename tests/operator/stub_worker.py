"""A fast stand-in for `spa-worker` in the operator fault tests: same argv, same contract (runner.run_stage writes the
outputs, then the manifest last, and heartbeats), but no model work: it sleeps STUB_SECONDS and writes a small file.

Used where the operator's handling of a fault is under test, not the worker; the full-run test uses the real worker.
"""

from __future__ import annotations

import os
import re
import sys
import time

from spa_workers import contract
from spa_workers.contract import ManifestKeys as K
from spa_workers.runner import run_stage


def main(argv: list[str]) -> int:
    stage, rest = argv[0], argv[1:]
    args = contract.ARGS_BY_STAGE[stage].from_argv(rest)
    seconds = float(os.environ.get("STUB_SECONDS", "1"))

    def body(work) -> None:
        steps = 5
        for i in range(steps):
            work.progress(i, steps, force=True)
            time.sleep(seconds / steps)
        if stage in (contract.TRAIN, contract.SEED_TRAIN):
            os.makedirs(os.path.join(work.dir, contract.MODEL_SUBDIR), exist_ok=True)
            with open(os.path.join(work.dir, contract.MODEL_SUBDIR, "config.json"), "w") as fh:
                fh.write('{"stub": true}')
            work.metrics.update({K.LOSS: 0.69, K.REWARD_ACCURACY: 0.5, K.REFINED_FRACTION: 0.1})
        else:
            with open(os.path.join(work.dir, "out.txt"), "w") as fh:
                fh.write(stage)
            if stage == contract.JUDGE:
                work.counts[K.PAIRS] = 4
                work.metrics[K.REWARD_GAP] = 0.25
            if stage == contract.EVALUATE:
                # STUB_AGREEMENT="a0,a1,...": iteration i's held-out agreement (the quality-gate tests)
                per_iteration = os.environ.get("STUB_AGREEMENT")
                iteration = int(re.search(r"iter-(\d+)", args.output).group(1))  # type: ignore[union-attr]
                work.metrics[K.HELDOUT_AGREEMENT] = float(per_iteration.split(",")[iteration]) if per_iteration \
                    else 0.5

    return run_stage(args, body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
