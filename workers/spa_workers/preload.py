"""The libraries a stage process imports before its first real work, named in one place.

`spa-worker` imports its stage's list before running the stage (so a stage's first work begins once they are in,
and `startup_s` in its manifest measures what getting there cost), and `spa run`'s warm start (spa_operator.warm)
imports the union of a run's lists once, in the server its stage processes are forked from. Importing this module
itself imports nothing heavy.

Only imports: nothing here may run a torch op (the OpenMP pool would start), call a tokenizer (the rayon pool) or
touch CUDA, because the warm server forks after importing these. Names are modules, not attributes: transformers
and vLLM load their classes lazily, so the modules that define the classes the stages use are named directly.
"""

from __future__ import annotations

import importlib
import os
import time

from spa_workers import contract, launch
from spa_workers.contract import StageArgs

_IMPORTED_AT = time.time()

# Set before torch loads OpenMP, which reads them once (spa-worker sets them before importing anything heavy).
# OMP_WAIT_POLICY: spinning OpenMP threads slow every step when another process shares the cores (issue 11: a
# generation step took 1-7 s instead of 0.14 s on 2 shared cores); passive waiting costs little otherwise.
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

TOKENIZER = (
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.configuration_auto",
    "transformers.tokenization_utils_fast",
)
MODEL = (
    "torch",
    *TOKENIZER,
    "transformers.models.auto.modeling_auto",
    "transformers.generation.utils",
    "transformers.models.llama.modeling_llama",  # the tiny model, SmolLM2, Llama
    "safetensors.torch",
)
TRAINING = (*MODEL, "accelerate", "datasets", "peft", "trl", "trl.trainer.dpo_trainer", "trl.trainer.dpo_config",
            "spa_workers.spa_trainer", "spa_workers.train")
VLLM = ("vllm.entrypoints.llm", "vllm.sampling_params", "vllm.inputs", "spa_workers.vllm_engine")
JUDGE_CLIENT = ("openai", "spa_workers.winrate")


def modules_for(args: StageArgs) -> tuple[str, ...]:
    """What the stage of `args` imports before its first work (its own module included)."""
    stage = args.stage
    if stage == contract.VALIDATE:
        return (*TOKENIZER, "spa_workers.validate")
    if stage in (contract.TRAIN, contract.SEED_TRAIN):
        # A multi-process stage re-runs itself under `accelerate launch` (launch.py): its ranks import the rest.
        return ("torch",) if launch.needs_launch(args) else TRAINING  # type: ignore[arg-type]
    backends = {getattr(args, name, "") for name in ("backend", "answer_backend")}
    mods = [*MODEL, *(VLLM if "vllm" in backends else ())]
    if stage == contract.GENERATE:
        mods.append("spa_workers.generate")
    elif stage == contract.JUDGE:
        mods.append("spa_workers.judge")
    else:  # evaluate
        mods += [*(JUDGE_CLIENT if getattr(args, "winrate_prompts", None) else ()), "spa_workers.evaluate"]
    return tuple(mods)


def import_all(modules: tuple[str, ...] | list[str]) -> None:
    for name in modules:
        importlib.import_module(name)


SCHEDULED_AT_ENV = "SPA_SCHEDULED_AT"  # time.time() when `spa run` scheduled the stage (set by the local executor)


def seconds_since_scheduled() -> float:
    """Seconds since `spa run` scheduled this stage or, without it (a pod, a shell), since this process started."""
    try:
        since = float(os.environ[SCHEDULED_AT_ENV])
    except (KeyError, ValueError):
        since = process_start_time()
    return max(0.0, time.time() - since)


def process_start_time() -> float:
    """When this process started (Linux: from /proc; elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT

