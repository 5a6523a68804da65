"""The stage contract: one definition of every stage's arguments, outputs and manifests.

The planner builds a stage's command line from these dataclasses (`to_argv`), the worker parses it back
(`from_argv`), so the local executor, the Kubernetes executor and the workers cannot drift apart.
This module must stay importable without torch: the operator imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from spa_workers import storage

MANIFEST = "_SUCCESS.json"
PROGRESS = "_PROGRESS.json"
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

# Where each stage's outputs live inside its output dir.
MODEL_SUBDIR = "model"
RESPONSES_FILE = "responses.jsonl"
PAIRS_FILE = "pairs.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class StageManifest:
    """Written last by a finished stage (or shard): its presence is what "done" means."""

    stage: str
    # relative path -> {"bytes": n, "sha256": hex}; a file above ETAG_IDENTIFIES_ABOVE published to S3:
    # {"bytes": n, "etag": S3's ETag, "part_bytes": the upload's part size}
    files: dict[str, dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    contract_version: int = CONTRACT_VERSION
    # What determines the outputs (see `fingerprint`); "" in manifests written before fingerprints existed.
    fingerprint: str = ""
    fingerprint_of: dict[str, Any] = field(default_factory=dict)
    # What the stage spent (`Ledger` keys only, each >= 0); the names of entries that are estimates, not counts.
    ledger: dict[str, float] = field(default_factory=dict)
    ledger_estimated: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageManifest:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        # A manifest written before the finite-numbers rule may hold NaN: readers (the operator's status, reports,
        # metrics) must never pass it on, so such figures are dropped here, where every reader gets its manifests.
        for section in (manifest.counts, manifest.metrics, manifest.timings, manifest.ledger):
            for key in [k for k, v in section.items() if non_finite(v)]:
                del section[key]
        return manifest


def read_manifest(stage_dir: str) -> StageManifest | None:
    uri = storage.join(stage_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    return StageManifest.from_json(storage.read_text(uri))


def stage_manifest_dirs(args: StageArgs) -> list[str]:
    """Every directory whose manifest must exist for the stage as a whole to be done."""
    if args.sharded:
        n = args.shard_count  # type: ignore[attr-defined]
        return [shard_dir(args.output, i, n) for i in range(n)]  # type: ignore[attr-defined]
    return [args.output]  # type: ignore[attr-defined]


def read_stage_manifests(args: StageArgs) -> list[StageManifest] | None:
    """All manifests of a stage, or None while any shard is unfinished."""
    out = []
    for d in stage_manifest_dirs(args):
        m = read_manifest(d)
        if m is None:
            return None
        out.append(m)
    return out


def finished_shard_dirs(stage_output: str) -> list[str]:
    """Shard dirs of a sharded stage that carry a manifest, in order, checked for completeness."""
    dirs = sorted(d for d in storage.list_dirs(stage_output) if os.path.basename(d.rstrip("/")).startswith("shard-"))
    if not dirs:
        raise StageInputError(f"{stage_output}: no shard output found (has the previous stage run?)")
    total = int(dirs[0].rstrip("/").rsplit("-of-", 1)[1])
    done = [d for d in dirs if storage.exists(storage.join(d, MANIFEST))]
    if len(done) != total:
        raise StageInputError(f"{stage_output}: {len(done)} of {total} shards finished; refusing partial input")
    return done


# Above this size a file published to S3 is identified in its manifest by its ETag, which S3 computed from the
# bytes it received (the MD5 of the MD5s of its multipart parts; boto3 also sends a CRC32 checksum with each part,
# which S3 checks), instead of a sha256 that would read the file once more (~1.5 s for 538 MB here, minutes at 14.5
# GB). Smaller files and local outputs keep their sha256.
ETAG_IDENTIFIES_ABOVE = storage.MULTIPART_THRESHOLD


def file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "trl", "peft", "vllm"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    engines = getattr(sys.modules.get("spa_workers.vllm_engine"), "BUILT", None)
    if engines:  # how the answers or scores were computed (vllm_engine.engine_mode)
        out["vllm_engine"] = ", ".join(dict.fromkeys(engines))
    return out


class Heartbeat:
    """Writes `_PROGRESS.json` at most every `interval` seconds (and at 0 and 1)."""

    def __init__(self, output: str, total: int, interval: float = 15.0, unit: str = "items") -> None:
        self.output, self.total, self.interval, self.unit = output, max(total, 1), interval, unit
        self.start = time.monotonic()
        self.last = -1e9
        self.done = 0

    def update(self, done: int, force: bool = False, **extra: float) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = min(done / self.total, 1.0)
        eta = (self.total - done) / rate if rate > 0 else None
        payload = {"fraction": frac, "done": done, "total": self.total, "unit": self.unit,
                   "rate_per_s": rate, "eta_s": eta, "elapsed_s": elapsed, "time": time.time(),
                   **{k: v for k, v in extra.items() if not non_finite(v)}}  # a live figure may be NaN mid-step
        storage.write_text(storage.join(self.output, PROGRESS), dumps(payload))


# Names of the counts / metrics each stage puts in its manifest. The CLI's summary table, the operator's status and
# Prometheus read these names, so they are defined once here.
class ManifestKeys:
    # generate: counts
    PROMPTS = "prompts"
    RESPONSES = "responses"
    GENERATED_TOKENS = "generated_tokens"
    # generate: metrics
    TOKENS_PER_S = "tokens_per_s"
    ANSWER_TOKENS = "answer_tokens_mean"  # mean tokens per sampled answer (π_{i-1} on iteration i's prompts)
    # judge: counts
    PAIRS = "pairs"
    DROPPED_IDENTICAL = "dropped_identical"
    DROPPED_EMPTY = "dropped_empty"
    # judge: metrics
    REWARD_GAP = "reward_gap_mean"
    CHOSEN_REWARD = "chosen_reward_mean"
    REJECTED_REWARD = "rejected_reward_mean"
    CONFIDENCE = "confidence_mean"
    PAIRS_PER_S = "pairs_per_s"
    # train / seed-train: metrics
    LOSS = "loss"
    REWARD_ACCURACY = "reward_accuracy"
    REFINED_FRACTION = "refined_fraction"
    THRESHOLD = "threshold"
    MARGIN = "margin_mean"
    SAMPLES_PER_S = "samples_per_s"
    STEPS = "steps"
    # evaluate: metrics
    HELDOUT_AGREEMENT = "heldout_agreement"
    HELDOUT_AGREEMENT_SE = "heldout_agreement_se"  # binomial standard error sqrt(p(1-p)/n)
    WIN_RATE = "win_rate"  # percent, alpaca_eval's definition
    WIN_RATE_SE = "win_rate_se"
    LC_WIN_RATE = "lc_win_rate"  # length-controlled, percent
    LC_WIN_RATE_SE = "lc_win_rate_se"
    FIRST_POSITION_RATE = "judge_first_position_rate"  # how often the judge prefers the output shown first
    # evaluate: mean answer length in tokens (the policy's tokenizer) on the win-rate prompts, same sampling settings
    EVAL_ANSWER_TOKENS = "eval_answer_tokens_mean"  # π_i's answers
    SFT_ANSWER_TOKENS = "sft_answer_tokens_mean"  # π_init's (the SFT model's) answers: the length gate's baseline
    REFERENCE_ANSWER_TOKENS = "reference_answer_tokens_mean"  # the reference answers the judge compares against
    # evaluate: counts (win rate)
    WINRATE_PROMPTS = "winrate_prompts"  # prompts judged in both orders
    JUDGE_FAILED = "judge_failed"  # judgments given up after retries (their prompts are left out and counted)
    JUDGE_REFUSED = "judge_refused"  # replies that parsed but named neither output (not asked again: temperature 0)
    JUDGE_CACHED = "judge_cached"  # judgments found in the run's judgment cache (not asked, not paid)
    JUDGE_CALLS = "judge_calls"  # judge requests that got a reply (paid), with the tokens their `usage` reports
    JUDGE_PROMPT_TOKENS = "judge_prompt_tokens"
    JUDGE_COMPLETION_TOKENS = "judge_completion_tokens"
    JUDGE_RETRY_COUNTS = ("judge_http_attempts", "judge_rate_limited", "judge_server_errors", "judge_client_errors",
                          "judge_no_response", "judge_refused")
    # generate / judge / evaluate / train: prompts too long for max_prompt_length, left out
    SKIPPED_LONG_PROMPTS = "skipped_long_prompt"
    # train / seed-train: counts
    EFFECTIVE_BATCH = "effective_batch_size"
    PROCESSES = "processes"
    RESUMED_FROM_STEP = "resumed_from_step"


class Ledger:
    """What a stage spent, counted by the stage into its manifest's `ledger` and summed per iteration and per run by
    the planner's readers. Only these keys are allowed (the manifest and the status that copies it stay bounded)."""

    GOLD_LABELS = "gold_labels"  # gold (human-labelled) pairs read: seed and held-out sets
    PROMPTS = "prompts"  # prompts answered
    ANSWERS_GENERATED = "answers_generated"
    TOKENS_GENERATED = "tokens_generated"
    PAIRS_JUDGED = "pairs_judged"  # pairs the judge produced
    TOKENS_SCORED = "tokens_scored"  # prompt+answer tokens through the judge's (or evaluation's) forward passes
    PAIRS_TRAINED = "pairs_trained"  # pair-epochs: pairs seen by training, each epoch counted
    TOKENS_TRAINED = "tokens_trained"  # prompt+answer tokens of the pairs trained on, each epoch counted
    ACCELERATOR_SECONDS = "accelerator_seconds"  # requested GPUs x wall time of the stage's pods
    CPU_SECONDS = "cpu_seconds"  # CPU time the stage's processes used (measured: resource usage of every rank)
    CPU_SECONDS_REQUESTED = "cpu_seconds_requested"  # requested CPUs x wall time (where the pod requests CPUs)
    BYTES_READ = "bytes_read"  # from storage (models and data downloaded, inputs read)
    BYTES_WRITTEN = "bytes_written"  # to storage (the published outputs)
    JUDGE_CALLS = "judge_calls"  # requests to the win-rate judge endpoint
    JUDGE_PROMPT_TOKENS = "judge_prompt_tokens"
    JUDGE_COMPLETION_TOKENS = "judge_completion_tokens"

    KEYS: ClassVar[tuple[str, ...]] = (
        GOLD_LABELS, PROMPTS, ANSWERS_GENERATED, TOKENS_GENERATED, PAIRS_JUDGED, TOKENS_SCORED, PAIRS_TRAINED,
        TOKENS_TRAINED, ACCELERATOR_SECONDS, CPU_SECONDS, CPU_SECONDS_REQUESTED, BYTES_READ, BYTES_WRITTEN,
        JUDGE_CALLS, JUDGE_PROMPT_TOKENS, JUDGE_COMPLETION_TOKENS)


# What a stage's pods requested, set by the executors (jobs.worker_env, the local executor) so that a stage can count
# accelerator-seconds as requested GPUs x wall time: GPUs per pod (a whole number), CPUs per pod (a decimal).
REQUESTED_GPUS_ENV = "SPA_REQUESTED_GPUS"
REQUESTED_CPUS_ENV = "SPA_REQUESTED_CPUS"
# The seconds of a stage's wall time spent on the items it counts (answers sampled, answers scored, pairs trained),
# without loading models: with the ledger's counts, the rates the operator's ETA scales by (timings key).
WORK_SECONDS = "work_s"


def check_ledger(ledger: dict[str, float], what: str) -> None:
    """A ledger holds known keys only, each a finite number >= 0 (a bug otherwise: the stage's own counting)."""
    unknown = sorted(set(ledger) - set(Ledger.KEYS))
    negative = sorted(k for k, v in ledger.items() if isinstance(v, int | float) and v < 0)
    if unknown or negative:
        raise ValueError(f"{what}: ledger entries {unknown or negative} are {'unknown' if unknown else 'negative'}")
