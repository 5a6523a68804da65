"""Every stage's arguments: the planner builds a stage's command line from these dataclasses (`to_argv`), the worker
parses it back (`from_argv`), so the local executor, the Kubernetes executor and the workers cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from spa_workers.contract.common import EVALUATE, GENERATE, JUDGE, SEED_TRAIN, TRAIN, VALIDATE


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A StageArgs class's resolved field types (resolving them per call cost the operator ~1 ms per Job)."""
    return get_type_hints(cls)


@dataclass(frozen=True)
class StageArgs:
    """Base for the per-stage argument sets. Fields map 1:1 to `--kebab-case` flags."""

    stage: ClassVar[str]
    sharded: ClassVar[bool] = False

    def to_argv(self) -> list[str]:
        return self.to_argv_without(())

    def to_argv_without(self, left_out: Sequence[str]) -> list[str]:
        """The command line, less the fields `left_out` (they parse back to their defaults)."""
        argv = [self.stage]
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in left_out and value == f.default):
                continue
            if hints[f.name] is bool:
                argv.append(_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, list | tuple):
                argv += [_flag(f.name), ",".join(str(v) for v in value)]
            else:
                argv += [_flag(f.name), str(value)]
        return argv

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"spa-worker {cls.stage}", description=cls.__doc__)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            help_text = f.metadata.get("help", "")
            if hint is bool:
                p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
                continue
            conv = _converter(hint)
            p.add_argument(_flag(f.name), dest=f.name, type=conv, required=required, default=default, help=help_text)
        return p

    @classmethod
    def from_argv(cls, argv: Sequence[str]):
        ns = cls.parser().parse_args(list(argv))
        return cls(**vars(ns))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _converter(hint: Any):
    hint_text = str(hint)
    if hint is int or hint_text in ("int | None", "typing.Optional[int]"):
        return int
    if hint is float or hint_text in ("float | None", "typing.Optional[float]"):
        return float
    if "list[float]" in hint_text:
        return _floats
    return str


@dataclass(frozen=True)
class GenerateArgs(StageArgs):
    """Sample answers from the policy for a slice of the prompt set."""

    stage: ClassVar[str] = GENERATE
    sharded: ClassVar[bool] = True

    policy: str = field(metadata={"help": "model URI (path, s3://, hf://)"})
    prompts: str = field(metadata={"help": "prompt file (JSONL/Parquet)"})
    output: str = field(metadata={"help": "output URI (stage directory)"})
    slice_start: int = 0
    slice_end: int = -1
    responses_per_prompt: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 300
    seed: int = 0
    backend: str = field(default="vllm", metadata={"help": "vllm | transformers"})
    batch_size: int = 16
    shard_index: int = -1
    shard_count: int = 1
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM engine", "execution": True})


@dataclass(frozen=True)
class JudgeArgs(StageArgs):
    """Score each answer by the policy's implicit DPO reward against the reference and pick pairs."""

    stage: ClassVar[str] = JUDGE
    sharded: ClassVar[bool] = True

    policy: str
    reference: str
    responses: str = field(metadata={"help": "output URI of the generate stage"})
    output: str
    beta: float = 0.1
    pairing: str = field(default="min-max", metadata={"help": "min-max | max-random"})
    seed: int = 0
    backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    max_batch_tokens: int = 8192
    max_length: int = 2048
    max_prompt_length: int = 1024
    shard_index: int = -1
    shard_count: int = 1
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per vLLM engine", "execution": True})


@dataclass(frozen=True)
class TrainArgs(StageArgs):
    """DPO (with SPA self-refinement when enabled) from `model`, against `reference` (default: `model`)."""

    stage: ClassVar[str] = TRAIN

    model: str
    pairs: str = field(metadata={"help": "judge output URI, or a gold preference file"})
    output: str
    reference: str | None = None
    beta: float = 0.1
    learning_rate: float = 5e-7
    epochs: float = 1.0
    batch_size: int = 32
    per_device_batch_size: int = 0
    max_length: int = 2048
    max_prompt_length: int = 1024
    refinement: bool = True
    low_confidence_fraction: float = 0.1
    smoothing: float = 0.1
    warmup_fraction: float = 0.2
    window: int = 50
    extrapolation: float = 0.0
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    seed: int = 0
    # How the stage runs, not what it computes (a fingerprint leaves `execution` fields out).
    processes: int = field(default=1, metadata={"help": "processes per node (one per GPU)", "execution": True})
    nodes: int = field(default=1, metadata={"help": "nodes (pods) training together", "execution": True})
    strategy: str = field(default="auto", metadata={"help": "auto | fsdp | deepspeed | ddp", "execution": True})
    checkpoint_every_steps: int = field(default=0, metadata={"help": "0 = by time only", "execution": True})
    checkpoint_every_minutes: float = field(default=60.0, metadata={"help": "0 = by steps only", "execution": True})


@dataclass(frozen=True)
class SeedTrainArgs(TrainArgs):
    """Plain DPO on the gold seed pairs from the SFT model."""

    stage: ClassVar[str] = SEED_TRAIN


@dataclass(frozen=True)
class EvaluateArgs(StageArgs):
    """Held-out gold agreement of the policy's implicit reward against the reference, and/or a win rate against a
    reference's answers judged over the OpenAI-compatible chat API (key from $SPA_JUDGE_API_KEY, never an argument)."""

    stage: ClassVar[str] = EVALUATE

    policy: str
    reference: str
    output: str
    heldout: str | None = field(default=None, metadata={"help": "gold pairs for held-out agreement"})
    beta: float = 0.1
    backend: str = field(default="transformers", metadata={"help": "transformers | vllm"})
    max_batch_tokens: int = 8192
    max_length: int = 2048
    max_prompt_length: int = 1024
    # win rate (all off unless winrate_prompts is given)
    winrate_prompts: str | None = field(default=None, metadata={"help": "prompts for the win rate"})
    winrate_samples: int = field(default=0, metadata={"help": "first N prompts (0 = all)"})
    winrate_reference_answers: str | None = field(
        default=None, metadata={"help": "reference answers, one row per prompt (column answer or output)"})
    winrate_reference_model: str | None = field(
        default=None, metadata={"help": "model whose sampled answers are the reference (default: --reference)"})
    answer_backend: str = field(default="transformers", metadata={"help": "vllm | transformers"})
    answer_max_new_tokens: int = 300
    answer_temperature: float = 0.7
    seed: int = 0
    judge_endpoint: str | None = field(default=None, metadata={"help": "OpenAI-compatible base URL (…/v1)"})
    judge_model: str | None = None
    judge_extra_body: str | None = field(default=None, metadata={"help": "JSON object added to every request"})
    judge_max_failed_fraction: float = field(
        default=0.05, metadata={"help": "fail the stage if more prompts than this lose a judgment"})
    judge_concurrency: int = field(default=8, metadata={"help": "requests in flight", "execution": True})
    judge_max_retries: int = field(default=5, metadata={"help": "per request", "execution": True})
    judge_timeout_s: float = field(default=60.0, metadata={"help": "per request", "execution": True})
    lc_glm: str = field(default="minimal", metadata={
        "help": "minimal (any prompts) | alpaca_eval_v1 (the 805 AlpacaEval instructions, in order)", "added": True})
    length_baseline: str | None = field(default=None, metadata={
        "help": "the SFT model, whose answers' mean length the length gate compares with (when the reference "
                "answers are not its own)", "added": True})
    cache: str | None = field(default=None, metadata={
        "help": "the run's cache (judgments, sampled answers, held-out figures)", "execution": True})

    # flags that mean nothing without --winrate-prompts (left out of the command line then)
    WIN_RATE_ONLY: ClassVar[tuple[str, ...]] = (
        "winrate_samples", "answer_backend", "answer_max_new_tokens", "answer_temperature", "seed",
        "judge_max_failed_fraction", "judge_concurrency", "judge_max_retries", "judge_timeout_s", "lc_glm")

    def to_argv(self) -> list[str]:
        if self.winrate_prompts:
            return super().to_argv()
        return super().to_argv_without(self.WIN_RATE_ONLY)


@dataclass(frozen=True)
class ValidateArgs(StageArgs):
    """Check every input of a run before any GPU work: files parse, rows are usable, models load, storage is
    writable. Cheap and CPU-only."""

    stage: ClassVar[str] = VALIDATE

    model: str = field(metadata={"help": "the SFT model URI"})
    seed_pairs: str = field(metadata={"help": "gold preference pairs (spec.data.seed)"})
    prompts: str = field(metadata={"help": "prompt file"})
    output: str
    heldout: str | None = field(default=None, metadata={"help": "held-out gold pairs (optional)"})
    prompts_needed: int = field(default=0, metadata={"help": "prompts the iterations take from the prompt file"})
    # the win rate's inputs (spec.evaluation.winRate), named as in EvaluateArgs: fingerprint.INPUT_FIELDS knows them
    winrate_prompts: str | None = field(default=None, metadata={"help": "prompts for the win rate"})
    winrate_samples: int = field(default=0, metadata={"help": "prompts the win rate takes (0 = all)"})
    winrate_reference_answers: str | None = field(
        default=None, metadata={"help": "reference answers, one row per prompt (column answer or output)"})
    winrate_reference_model: str | None = field(
        default=None, metadata={"help": "model whose sampled answers are the reference"})
    # the judge, probed with one small request (and the key from $SPA_JUDGE_API_KEY)
    judge_endpoint: str | None = field(default=None, metadata={"help": "OpenAI-compatible base URL (…/v1)",
                                                               "added": True})
    judge_model: str | None = field(default=None, metadata={"added": True})
    judge_extra_body: str | None = field(default=None, metadata={"help": "JSON object added to every request",
                                                                 "added": True})
    judge_timeout_s: float = field(default=60.0, metadata={"help": "per request", "execution": True})
    lc_glm: str = field(default="minimal", metadata={"help": "alpaca_eval_v1 needs the 805 AlpacaEval prompts",
                                                     "added": True})


ARGS_BY_STAGE: dict[str, type[StageArgs]] = {
    a.stage: a for a in (ValidateArgs, GenerateArgs, JudgeArgs, TrainArgs, SeedTrainArgs, EvaluateArgs)
}
