"""Train-step time on the tiny model (CPU): plain DPO vs the SPA loss at λ = 0 and at λ > 0.

Each variant is a real `SPATrainer` (`spa_workers.train.make_trainer`) running `training_step` (forward, loss,
backward) plus the optimiser step on the same batch; the baseline uses TRL's stock `DPOTrainer.compute_loss`.
Variants are timed interleaved, step by step, and the median is reported; the ratio is the median of the
per-round ratios, so slow phases of a shared machine cancel out.

    python benchmarks/bench_train.py
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time

WARMUP_STEPS = 3
TIMED_STEPS = 30
BATCH = 8
LAMBDA = 0.5


def _variants():
    from spa_workers.train import Refinement

    return [
        ("plain DPO (TRL)", None),
        ("SPA loss, λ=0", Refinement(extrapolation=0.0)),
        (f"SPA loss, λ={LAMBDA}", Refinement(extrapolation=LAMBDA)),
    ]


def bench_train() -> list[dict]:
    """Median seconds per optimiser step for each variant, with its ratio to plain DPO."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    threads = torch.get_num_threads()
    # One intra-op thread: on a busy 2-core box, two OpenMP threads competing with other processes make single
    # steps swing from 40 ms to seconds; one thread keeps the comparison stable (ratios, not peak speed, are
    # the point).
    torch.set_num_threads(1)
    try:
        return _bench()
    finally:
        torch.set_num_threads(threads)


def _bench() -> list[dict]:
    from spa_workers.contract import TrainArgs
    from spa_workers.data import load_pairs
    from spa_workers.modeling import load_tokenizer
    from spa_workers.tiny import make_tiny_example
    from spa_workers.train import make_trainer, training_rows

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        paths = make_tiny_example(os.path.join(tmp, "tiny"))
        args = TrainArgs(
            model=paths["model"],
            pairs=paths["seed"],
            output=os.path.join(tmp, "out"),
            batch_size=BATCH,
            learning_rate=1e-4,
            max_length=128,
        )
        rows, _ = training_rows(load_pairs(paths["seed"])[:BATCH], load_tokenizer(paths["model"]), 1024)
        runs = []
        for name, refinement in _variants():
            trainer = make_trainer(
                args,
                rows,
                os.path.join(tmp, f"scratch-{len(runs)}"),
                refinement=refinement,
                max_steps=WARMUP_STEPS + TIMED_STEPS,
            )
            if refinement is None:  # the baseline is TRL's own DPO loss, not this project's plain-DPO branch
                from trl import DPOTrainer

                trainer.compute_loss = functools.partial(DPOTrainer.compute_loss, trainer)
            trainer.create_optimizer_and_scheduler(num_training_steps=WARMUP_STEPS + TIMED_STEPS)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
            runs.append((name, trainer, batch, []))

        def step(trainer, batch) -> float:
            t0 = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            trainer._micro.clear()  # per-step log records are not under test here
            return time.perf_counter() - t0

        for i in range(WARMUP_STEPS + TIMED_STEPS):
            for _, trainer, batch, times in runs[i % 3 :] + runs[: i % 3]:  # rotate who goes first
                elapsed = step(trainer, batch)
                if i >= WARMUP_STEPS:
                    times.append(elapsed)

    # The ratio is the median of per-round ratios: each round's variants ran within a few hundred milliseconds
    # of each other, so a slow phase of the machine cancels out (absolute medians alone swing by several x
    # here).
    plain_times = runs[0][3]
    return [
        {
            "benchmark": "train step (tiny model, CPU, 8 pairs)",
            "variant": name,
            "value": statistics.median(times),
            "unit": "s/step",
            "ratio_vs_plain": statistics.median(t / p for t, p in zip(times, plain_times, strict=True)),
        }
        for name, _, _, times in runs
    ]


if __name__ == "__main__":
    for row in bench_train():
        print(f"{row['variant']:>16}: {row['value'] * 1000:8.1f} ms/step  {row['ratio_vs_plain']:.2f}x")
    sys.exit(0)
