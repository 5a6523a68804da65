"""What every side of the stage contract shares: stage names, the exit codes executors act on, the error types a
worker turns into them, the finite-numbers rule for everything written as JSON, and where a shard writes."""

from __future__ import annotations

import json
import math
from typing import Any

from spa_workers import storage

CONTRACT_VERSION = 1
# spa-worker exit codes that executors act on (anything else non-zero is an ordinary, retryable failure).
EXIT_BAD_INPUT = 2  # the input must be fixed: retrying cannot help
EXIT_STORAGE = 3  # storage unreachable: worth retrying
# The evaluate stage's judge API key: set from spec.evaluation.winRate.judge.secretRef in a Job, from the user's
# environment under `spa run`; never an argument (arguments are recorded in manifests).
JUDGE_API_KEY_ENV = "SPA_JUDGE_API_KEY"

VALIDATE = "validate"
SEED_TRAIN = "seed-train"
GENERATE = "generate"
JUDGE = "judge"
TRAIN = "train"
EVALUATE = "evaluate"
STAGES = (VALIDATE, SEED_TRAIN, GENERATE, JUDGE, TRAIN, EVALUATE)


class StageInputError(Exception):
    """Bad input a user must fix; the worker prints it as one line and exits 2."""


class StageRetryableError(RuntimeError):
    """A failure another attempt may not meet (a service down or overloaded); the worker prints it as one line and
    exits 1, which executors retry."""


def dumps(obj: Any, **kwargs: Any) -> str:
    """JSON for everything a manifest, heartbeat, report or status carries. Non-finite numbers are refused: Python
    would write the bare tokens NaN/Infinity, which are not JSON, and a Kubernetes API server (Go's decoder) answers
    them with 400, so one NaN copied into a status would freeze the run's status for good."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def non_finite(values: Any, path: str = "") -> list[str]:
    """Where `values` (numbers, or dicts/lists of them) holds a NaN or an infinity: "loss=nan", "a.b[2]=inf"."""
    if isinstance(values, bool):
        return []
    if isinstance(values, float):
        return [] if math.isfinite(values) else [f"{path or 'value'}={values}"]
    if isinstance(values, dict):
        return [bad for k, v in values.items() for bad in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(values, list | tuple):
        return [bad for i, v in enumerate(values) for bad in non_finite(v, f"{path}[{i}]")]
    return []


def require_finite(values: Any, what: str) -> None:
    """A stage's numbers must be finite: a NaN or infinite loss, reward or margin means a diverged or corrupt model
    (bad input, exit 2), never a result to publish."""
    bad = non_finite(values)
    if bad:
        raise StageInputError(f"{what}: non-finite {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}: the model "
                              "diverged or an input is corrupt (try a lower learning rate or check the model); "
                              "nothing was published")


def shard_dir(output: str, shard_index: int, shard_count: int) -> str:
    """Where one shard of a sharded stage writes; readers take only shard dirs that have a manifest."""
    return storage.join(output, f"shard-{shard_index:05d}-of-{shard_count:05d}")
