"""A fast stand-in for `spa-worker` in the operator fault tests: same argv, same contract (runner.run_stage writes the
outputs, then the manifest last, and heartbeats), but no model work: it sleeps STUB_SECONDS and writes a small file.

Its sizes follow the plan as the real stages' do: generate answers its slice of prompts (`responses_per_prompt`
answers of STUB_ANSWER_TOKENS tokens each), judge keeps one pair per prompt of the generate shards it reads, train
trains on the judge's pairs (seed-train on STUB_SEED_PAIRS), each epoch counted; it counts them into its ledger as the
real stages do. With STUB_ITEM_SECONDS, generate, judge and train also take that long per prompt (pair): a run whose
rates are known, for the ETA.

Used where the operator's handling of a fault is under test, not the worker; the full-run test uses the real worker.
"""

from __future__ import annotations

import os
import re
import sys
import time

from spa_workers import contract
from spa_workers.contract import Ledger
from spa_workers.contract import ManifestKeys as K
from spa_workers.runner import run_stage

ANSWER_TOKENS = int(os.environ.get("STUB_ANSWER_TOKENS", "4"))
SEED_PAIRS = int(os.environ.get("STUB_SEED_PAIRS", "8"))


def _upstream(uri: str, key: str) -> int:
    """The sum of a count over a sharded stage's finished shards (what a real stage would read)."""
    return sum(contract.read_manifest(d).counts.get(key, 0) for d in contract.finished_shard_dirs(uri))


def items(args: contract.StageArgs) -> int:
    """Prompts (generate, judge) or pairs (train) this stage (shard) handles."""
    if isinstance(args, contract.GenerateArgs | contract.JudgeArgs):
        total = (args.slice_end - args.slice_start if isinstance(args, contract.GenerateArgs)
                 else _upstream(args.responses, K.PROMPTS))
        return total * (args.shard_index + 1) // args.shard_count - total * args.shard_index // args.shard_count
    if isinstance(args, contract.TrainArgs):
        pairs = SEED_PAIRS if args.stage == contract.SEED_TRAIN else _upstream(args.pairs, K.PAIRS)
        return round(pairs * args.epochs)
    return 0


def spend(work, args: contract.StageArgs, n: int) -> None:
    """The ledger a real stage of this size would count."""
    if isinstance(args, contract.GenerateArgs):
        answers = n * args.responses_per_prompt
        work.counts.update({K.PROMPTS: n, K.RESPONSES: answers})
        for key, value in ((Ledger.PROMPTS, n), (Ledger.ANSWERS_GENERATED, answers),
                           (Ledger.TOKENS_GENERATED, answers * ANSWER_TOKENS)):
            work.spend(key, value)
    elif isinstance(args, contract.JudgeArgs):
        work.counts.update({K.PROMPTS: n, K.PAIRS: n})
        work.spend(Ledger.PAIRS_JUDGED, n)
        work.spend(Ledger.TOKENS_SCORED, n * 2 * 2 * (8 + ANSWER_TOKENS))  # 2 answers, 2 models, prompt + answer
    elif isinstance(args, contract.TrainArgs):
        work.counts[K.PAIRS] = n
        work.spend(Ledger.PAIRS_TRAINED, n)
        work.spend(Ledger.TOKENS_TRAINED, n * 2 * (8 + ANSWER_TOKENS))
    elif isinstance(args, contract.ValidateArgs):
        work.spend(Ledger.GOLD_LABELS, SEED_PAIRS + (4 if args.heldout else 0))


def main(argv: list[str]) -> int:
    stage, rest = argv[0], argv[1:]
    args = contract.ARGS_BY_STAGE[stage].from_argv(rest)
    seconds = float(os.environ.get("STUB_SECONDS", "1"))
    per_item = float(os.environ.get("STUB_ITEM_SECONDS", "0"))

    def body(work) -> None:
        steps = 5
        for i in range(steps):
            work.progress(i, steps, force=True)
            time.sleep(seconds / steps)
        n = items(work.args)
        if per_item and work.args.stage in (contract.GENERATE, contract.JUDGE, contract.TRAIN):
            t0 = time.time()
            time.sleep(n * per_item)
            work.timings[contract.WORK_SECONDS] = time.time() - t0
        spend(work, work.args, n)
        if stage in (contract.TRAIN, contract.SEED_TRAIN):
            os.makedirs(os.path.join(work.dir, contract.MODEL_SUBDIR), exist_ok=True)
            with open(os.path.join(work.dir, contract.MODEL_SUBDIR, "config.json"), "w") as fh:
                fh.write('{"stub": true}')
            work.metrics.update({K.LOSS: 0.69, K.REWARD_ACCURACY: 0.5, K.REFINED_FRACTION: 0.1})
        else:
            with open(os.path.join(work.dir, "out.txt"), "w") as fh:
                fh.write(stage)
            if stage == contract.JUDGE:
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
