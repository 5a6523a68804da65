"""The AlignmentRun resource: spec model, paper defaults and validation (shared by `spa run` and the operator).

Every validation error names the field by its manifest path, e.g. `spec.training.beta`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_VERSION = "spa.dev/v1alpha1"
KIND = "AlignmentRun"
PAPER_PROMPTS_PER_ITERATION = [8000, 20000, 30000]
# Length bounds (the CRD has the same ones: they also keep the cost of its CEL rules bounded).
MAX_URI = 4096
MAX_NAME = 253
MAX_IMAGE = 1024
DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# A Kubernetes resource quantity ("500m", "4", "16Gi").
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


class SpecError(ValueError):
    """An invalid AlignmentRun; `field` is the manifest path of the first offending field."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field, self.message, self.source = field, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSpec(_Model):
    sft: str = Field(min_length=1, max_length=MAX_URI,
                     description="The SFT model: first policy and the judge's fixed reference.")


class DataSpec(_Model):
    seed: str = Field(min_length=1, max_length=MAX_URI, description="Gold preference pairs (JSONL/Parquet).")
    prompts: str = Field(min_length=1, max_length=MAX_URI,
                         description="Unlabelled prompts, sliced in order across iterations.")
    heldout: str | None = Field(default=None, min_length=1, max_length=MAX_URI,
                                description="Gold pairs never trained on, to measure the judge.")


class IterationsSpec(_Model):
    count: int = Field(default=3, ge=0, le=50)
    prompts_per_iteration: list[int] | int | None = Field(
        default=None, description="Prompts per iteration: one number or one per iteration (paper: 8000,20000,30000).")

    @field_validator("prompts_per_iteration")
    @classmethod
    def _positive(cls, v: list[int] | int | None) -> list[int] | int | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if any(x < 1 for x in values):
            raise ValueError("must be >= 1")
        return v

    def per_iteration(self) -> list[int]:
        v = self.prompts_per_iteration
        if v is None:
            return PAPER_PROMPTS_PER_ITERATION[: self.count]
        return [v] * self.count if isinstance(v, int) else list(v)


class GenerationSpec(_Model):
    responses_per_prompt: int = Field(default=2, ge=2, le=64)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=300, ge=1, le=32768)
    backend: Literal["vllm", "transformers"] = "vllm"
    shards: int = Field(default=1, ge=1, le=1024)
    seed: int = Field(default=0, ge=0)


class JudgeSpec(_Model):
    pairing: Literal["min-max", "max-random"] = "min-max"
    reference: Literal["initial", "previous"] = Field(
        default="initial", description="initial: the SFT model (paper); previous: the previous iteration's model.")
    backend: Literal["transformers", "vllm"] = "transformers"
    shards: int = Field(default=1, ge=1, le=1024)


class LoraSpec(_Model):
    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class RefinementSpec(_Model):
    enabled: bool = True
    low_confidence_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    smoothing: float = Field(default=0.1, ge=0.0, lt=0.5)
    warmup_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    window: int = Field(default=50, ge=1, le=100000)
    extrapolation: list[float] | float | None = Field(
        default=None, description="λ per iteration or one number; default 1/2^i (0.5, 0.25, 0.125); 0 turns it off.")

    @field_validator("extrapolation")
    @classmethod
    def _non_negative(cls, v: list[float] | float | None) -> list[float] | float | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if any(x < 0 or x > 10 for x in values):
            raise ValueError("must be between 0 and 10")
        return v

    def per_iteration(self, count: int) -> list[float]:
        v = self.extrapolation
        if v is None:
            return [0.5**i for i in range(1, count + 1)]
        return [float(v)] * count if isinstance(v, int | float) else [float(x) for x in v]


class TrainingSpec(_Model):
    beta: float = Field(default=0.1, gt=0.0, le=10.0)
    learning_rate: float = Field(default=5e-7, gt=0.0, le=1.0)
    seed_epochs: float = Field(default=3, gt=0, le=100)
    epochs_per_iteration: float = Field(default=1, gt=0, le=100)
    batch_size: int = Field(default=32, ge=1, le=65536)
    micro_batch_size: int = Field(default=0, ge=0, le=65536, description="Per-device batch; 0 = batchSize.")
    max_length: int = Field(default=2048, ge=8, le=1 << 20)
    max_prompt_length: int = Field(default=1024, ge=4, le=1 << 20)
    seed: int = Field(default=0, ge=0)
    lora: LoraSpec | None = None
    refinement: RefinementSpec = RefinementSpec()

    @model_validator(mode="after")
    def _lengths(self) -> TrainingSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("maxPromptLength must be smaller than maxLength")
        return self


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=MAX_NAME)


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    key: str = Field(default="api-key", min_length=1, max_length=MAX_NAME)


class JudgeEndpointSpec(_Model):
    endpoint: str = Field(min_length=1, max_length=MAX_URI, pattern=r"^https?://",
                          description="Base URL of an OpenAI-compatible chat API, e.g. http://judge:8000/v1.")
    model: str = Field(min_length=1, max_length=MAX_NAME, description="Model name the endpoint serves.")
    secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key (spa run: the SPA_JUDGE_API_KEY variable).")
    concurrency: int = Field(default=8, ge=1, le=256)
    max_retries: int = Field(default=5, ge=0, le=50)
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    max_failed_fraction: float = Field(default=0.05, ge=0.0, le=1.0,
                                       description="Fail the stage when more prompts than this lose a judgment.")
    extra_body: dict[str, Any] | None = Field(
        default=None, description="Extra fields for every request, e.g. vLLM's {structured_outputs: {choice: [m, M]}} "
                                  "to hold a small judge to the two identifiers.")


class WinRateSpec(_Model):
    prompts: str = Field(min_length=1, max_length=MAX_URI, description="Prompts to answer and judge (JSONL/Parquet).")
    samples: int = Field(default=0, ge=0, le=1000000, description="Use the first N prompts (0 = all).")
    reference_answers: str | None = Field(
        default=None, min_length=1, max_length=MAX_URI,
        description="Reference answers, one row per prompt in order (column answer or output).")
    reference_model: str | None = Field(
        default=None, min_length=1, max_length=MAX_URI,
        description="Model whose answers are the reference (default: model.sft); ignored with referenceAnswers.")
    max_new_tokens: int = Field(default=300, ge=1, le=32768)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    backend: Literal["vllm", "transformers"] = "vllm"
    judge: JudgeEndpointSpec


class EvaluationSpec(_Model):
    win_rate: WinRateSpec | None = Field(
        default=None, description="Win rate per iteration against a reference, judged by an LLM (AlpacaEval 2.0).")


GATE_METRICS = {"heldoutAgreement": "heldout_agreement", "winRate": "win_rate", "lcWinRate": "lc_win_rate"}


class GateSpec(_Model):
    metric: Literal["heldoutAgreement", "winRate", "lcWinRate"] = "heldoutAgreement"
    floor: float | None = Field(default=None, ge=0.0, le=100.0,
                                description="Stop when the metric falls below this (agreement 0-1, win rates %).")
    max_drop: float | None = Field(default=None, ge=0.0, le=100.0,
                                   description="Stop when the metric falls more than this below the best iteration.")

    @model_validator(mode="after")
    def _some_rule(self) -> GateSpec:
        if self.floor is None and self.max_drop is None:
            raise ValueError("set floor and/or maxDrop")
        return self

    @property
    def manifest_key(self) -> str:
        return GATE_METRICS[self.metric]


class StorageSpec(_Model):
    uri: str = Field(min_length=1, max_length=MAX_URI,
                     description="s3://bucket/prefix (in a cluster); spa run also takes a local path.")
    endpoint: str | None = Field(default=None, min_length=1, max_length=MAX_URI)
    region: str | None = Field(default=None, min_length=1, max_length=64)
    secret_ref: SecretRef | None = None


class StageResources(_Model):
    gpus: int = Field(default=0, ge=0, le=64)
    cpu: str | None = Field(default=None, max_length=64, pattern=QUANTITY)
    memory: str | None = Field(default=None, max_length=64, pattern=QUANTITY)
    node_selector: dict[str, str] | None = Field(default=None, max_length=64)
    tolerations: list[dict[str, Any]] | None = Field(default=None, max_length=64)
    image: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE)


class ResourcesSpec(_Model):
    seed_train: StageResources | None = Field(default=None, alias="seedTrain")
    generate: StageResources | None = None
    judge: StageResources | None = None
    train: StageResources | None = None
    evaluate: StageResources | None = None


class AlignmentRunSpec(_Model):
    model: ModelSpec
    data: DataSpec
    iterations: IterationsSpec = IterationsSpec()
    generation: GenerationSpec = GenerationSpec()
    judge: JudgeSpec = JudgeSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec | None = None
    gate: GateSpec | None = Field(default=None, description="Stop early when quality falls (off when absent).")
    storage: StorageSpec | None = None
    resources: ResourcesSpec | None = None
    image: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE)
    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME)]] | None = Field(
        default=None, max_length=16)
    service_account_name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME, pattern=DNS_NAME)
    priority_class_name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME, pattern=DNS_NAME)
    queue_name: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS_NAME)
    suspend: bool = False
    max_retries_per_stage: int = Field(default=2, ge=0, le=20)
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=31536000)
    # Kubernetes executor only: the Job's activeDeadlineSeconds (a stuck stage fails and is retried).
    stage_deadline_seconds: int = Field(default=172800, ge=60, le=2592000)

    @model_validator(mode="after")
    def _per_iteration_lists(self) -> AlignmentRunSpec:
        n = self.iterations.count
        ppi = self.iterations.prompts_per_iteration
        if isinstance(ppi, list) and len(ppi) != n:
            raise _FieldError("iterations.promptsPerIteration",
                              f"has {len(ppi)} entries but iterations.count is {n}")
        if ppi is None and n > len(PAPER_PROMPTS_PER_ITERATION):
            raise _FieldError("iterations.promptsPerIteration",
                              f"required when iterations.count > {len(PAPER_PROMPTS_PER_ITERATION)}")
        lam = self.training.refinement.extrapolation
        if isinstance(lam, list) and len(lam) != n:
            raise _FieldError("training.refinement.extrapolation",
                              f"has {len(lam)} entries but iterations.count is {n}")
        win = self.evaluation.win_rate if self.evaluation else None
        if self.gate and self.gate.metric == "heldoutAgreement" and not self.data.heldout:
            raise _FieldError("gate.metric", "heldoutAgreement needs data.heldout")
        if self.gate and self.gate.metric != "heldoutAgreement" and not win:
            raise _FieldError("gate.metric", f"{self.gate.metric} needs evaluation.winRate")
        if self.gate and self.gate.metric == "heldoutAgreement" and any(
                v is not None and v > 1 for v in (self.gate.floor, self.gate.max_drop)):
            raise _FieldError("gate", "heldoutAgreement is a fraction: floor and maxDrop must be at most 1")
        if self.storage and not (self.storage.uri.startswith("s3://") or "://" not in self.storage.uri):
            raise _FieldError("storage.uri", "must be s3://bucket/prefix or a local path")
        return self


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class Metadata(_Model):
    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str = "default"
    uid: str | None = None


class AlignmentRun(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)
    api_version: Literal["spa.dev/v1alpha1"]
    kind: Literal["AlignmentRun"]
    metadata: Metadata
    spec: AlignmentRunSpec


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif item in ("list[int]", "int", "list[float]", "float", "function-after[_lengths(), TrainingSpec]"):
            continue  # pydantic union-branch / validator labels, not field names
        elif str(item).startswith(("function-", "list[", "literal[")):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts)


def parse_run(doc: Any, source: str | None = None, strict: bool = False) -> AlignmentRun:
    """Validate a manifest (dict) into an AlignmentRun, or raise SpecError naming the first bad field.

    strict: no type coercion ("3" is not an integer), as the Kubernetes API server validates; the operator uses it.
    """
    if not isinstance(doc, dict):
        raise SpecError("(document)", "expected a YAML mapping with apiVersion, kind, metadata, spec", source)
    try:
        return AlignmentRun.model_validate(doc, strict=strict)
    except ValidationError as e:
        err = e.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldError):
            raise SpecError(f"spec.{ctx_err.field}", str(ctx_err), source) from None
        path = _loc_to_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise SpecError(path or "(document)", msg, source) from None


def load_run(path: str | Path) -> AlignmentRun:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("(file)", "not found", str(path)) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError("(document)", f"not valid YAML: {e}", str(path)) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise SpecError("kind", f"expected exactly one {KIND} document, found {len(runs)}", str(path))
    return parse_run(runs[0], str(path))
