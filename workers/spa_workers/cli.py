"""`spa-worker <stage> ...`: the single entry point that Jobs and the local executor run."""

from __future__ import annotations

import importlib
import os
import sys

from spa_workers import contract, preload, runner
from spa_workers.contract import EXIT_BAD_INPUT, EXIT_STORAGE, StageInputError, StageRetryableError
from spa_workers.storage import StorageError

# stage name -> module with `run(args) -> int`
STAGE_MODULES = {
    contract.VALIDATE: "spa_workers.validate",
    contract.GENERATE: "spa_workers.generate",
    contract.JUDGE: "spa_workers.judge",
    contract.TRAIN: "spa_workers.train",
    contract.SEED_TRAIN: "spa_workers.train",
    contract.EVALUATE: "spa_workers.evaluate",
}


def one_write_per_line() -> None:
    """The ranks of a stage share one stderr; under PYTHONUNBUFFERED (set by many CI and container images) print()
    writes a line and its newline separately and two ranks' lines interleave. Buffer each line into one write."""
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    one_write_per_line()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGE_MODULES:
        print(f"usage: spa-worker {{{','.join(STAGE_MODULES)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    stage, rest = argv[0], argv[1:]
    args = contract.ARGS_BY_STAGE[stage].from_argv(rest)
    for key, value in preload.ENV_DEFAULTS.items():  # before torch loads OpenMP
        os.environ.setdefault(key, value)
    try:
        # The stage's libraries first (already imported under `spa run`'s warm start): its first work begins here.
        preload.import_all(preload.modules_for(args))
        runner.STARTUP["startup_s"] = preload.seconds_since_scheduled()
        module = importlib.import_module(STAGE_MODULES[stage])
        return int(module.run(args) or 0)
    except StageInputError as e:
        print(f"spa-worker {stage}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageRetryableError as e:
        print(f"spa-worker {stage}: error: {e}", file=sys.stderr)
        return 1
    except StorageError as e:  # transient: executors retry the stage
        print(f"spa-worker {stage}: error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except PermissionError as e:  # read-only output folder: retrying cannot help
        print(f"spa-worker {stage}: error: {e.filename}: not writable ({e.strerror})", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
