"""The AlignmentRun resource: spec model, paper defaults and validation (shared by `spa run` and the operator).

Every validation error names the field by its manifest path, e.g. `spec.training.beta`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

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
SINGLE_NODE_STAGES = ("generate", "judge", "evaluate")  # their pods work alone (shards split the data instead)
DNS_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# A Kubernetes resource quantity ("500m", "4", "16Gi"); never negative (a request or a limit).
QUANTITY = (r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# The same rules the API server applies (a URI that is only whitespace, an s3:// URI without a bucket, an image
# reference with spaces, a label value with a slash would pass a length check and fail in a pod).
# A URI: s3://<bucket>[/key], or anything else not starting with "s3://" and without surrounding whitespace. Spelt
# out without look-ahead, which neither pydantic's regex engine nor the API server's (RE2) has.
_REST = r"(.*\S)?"
URI = (rf"^(s3://[a-z0-9]([a-z0-9.-]{{0,61}}[a-z0-9])?(/.*)?|[^s\s]{_REST}|s([^3\s]{_REST})?|s3([^:\s]{_REST})?"
       rf"|s3:([^/\s]{_REST})?|s3:/([^/\s]{_REST})?)$")
URL = r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[^\s]*)?$"
REGION = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
IMAGE = r"^[a-zA-Z0-9]([a-zA-Z0-9._/:@-]*[a-zA-Z0-9])?$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
MAX_SEED = 2**32 - 1 - 64  # numpy's seed range; the generation seed gets the iteration added
MAX_YAML_NODES = 100_000  # a manifest is a few hundred nodes
MAX_COUNT = 10**9  # bound on free integers: CEL (int64) and the API server stay in range
ALPACA_EVAL_INSTRUCTIONS = 805  # AlpacaEval 2.0's evaluation set
MAX_OPAQUE_JSON = 16384  # serialised bytes of a free-form object (judge extraBody, affinity): CEL never reads inside
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# What the operator and the launcher set in a worker pod: a run cannot override it (the rendezvous, the ranks, the
# stage's identity, credentials and storage). NCCL_*/FI_* tuning variables are free.
RESERVED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "JOB_COMPLETION_INDEX",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING", "HF_HOME")
RESERVED_ENV_PREFIXES = ("SPA_", "AWS_", "TORCHELASTIC_", "ACCELERATE_")
# Label and annotation keys a run may not set on its pods: Kubernetes' own, the Job controller's, gang schedulers'
# pod-group keys (joining another run's gang), Kueue's, and the operator's.
RESERVED_KEY_DOMAINS = ("kubernetes.io", "k8s.io", "x-k8s.io", "volcano.sh", "spa.dev")
RESERVED_KEYS = ("job-name", "controller-uid")
# A reserved key, as a regular expression (RE2 and Python's re read it alike).
RESERVED_KEY = (r"^(([^/]*\.)?(" + "|".join(d.replace(".", r"\.") for d in RESERVED_KEY_DOMAINS) + r")/|("
                + "|".join(RESERVED_KEYS) + r")$)")
RESOURCE_NAME = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
CAPABILITY = r"^[A-Z][A-Z_]{0,31}$"


def opaque_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), allow_nan=False))


LabelKey = Annotated[str, Field(max_length=316, pattern=LABEL_KEY)]
OpaqueJSON = dict[str, Any]  # a free-form object: the API server checks it when the pod is created; CEL never reads it


class SpecError(ValueError):
    """An invalid AlignmentRun; `field` is the manifest path of the first offending field."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field, self.message, self.source = field, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelSpec(_Model):
    sft: str = Field(min_length=1, max_length=MAX_URI, pattern=URI,
                     description="The SFT model: first policy and the judge's fixed reference.")


class DataSpec(_Model):
    seed: str = Field(min_length=1, max_length=MAX_URI, pattern=URI,
                      description="Gold preference pairs (JSONL/Parquet).")
    prompts: str = Field(min_length=1, max_length=MAX_URI, pattern=URI,
                         description="Unlabelled prompts, sliced in order across iterations.")
    heldout: str | None = Field(default=None, min_length=1, max_length=MAX_URI, pattern=URI,
                                description="Gold pairs never trained on, to measure the judge.")


class IterationsSpec(_Model):
    count: int = Field(default=3, ge=0, le=50)
    prompts_per_iteration: list[int] | int | None = Field(
        default=None, description="Prompts per iteration: one number or one per iteration (paper: 8000,20000,30000).")

    @field_validator("prompts_per_iteration")
    @classmethod
    def _positive(cls, v: list[int] | int | None) -> list[int] | int | None:
        values = v if isinstance(v, list) else [] if v is None else [v]
        if any(x < 1 or x > MAX_COUNT for x in values):
            raise ValueError(f"must be between 1 and {MAX_COUNT}")
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
    batch_size: int = Field(default=16, ge=1, le=4096, description=(
        "Prompts per generate call with the transformers backend (its answers depend on it); vLLM batches "
        "continuously and ignores it."))
    shards: int = Field(default=1, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class JudgeSpec(_Model):
    pairing: Literal["min-max", "max-random"] = "min-max"
    reference: Literal["initial", "previous"] = Field(
        default="initial", description="initial: the SFT model (paper); previous: the previous iteration's model.")
    backend: Literal["transformers", "vllm"] = "transformers"
    shards: int = Field(default=1, ge=1, le=1024)


class LoraSpec(_Model):
    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1, le=65536)
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


class CheckpointSpec(_Model):
    every_steps: int = Field(default=0, ge=0, le=1 << 30,
                             description="Save a sharded checkpoint every this many optimiser steps (0: by time "
                                         "only).")
    every_minutes: float = Field(default=60.0, ge=0.0, le=10080.0,
                                 description="Save a sharded checkpoint at most every this many minutes of training "
                                             "(0: by steps only). A 7B full-parameter checkpoint (weights + Adam) is "
                                             "about 87 GB: the default keeps its cost to a few percent of a stage.")


class TrainingSpec(_Model):
    beta: float = Field(default=0.1, gt=0.0, le=10.0)
    learning_rate: float = Field(default=5e-7, gt=0.0, le=1.0)
    seed_epochs: float = Field(default=3, gt=0, le=100)
    epochs_per_iteration: float = Field(default=1, gt=0, le=100)
    batch_size: int = Field(default=32, ge=1, le=65536)
    micro_batch_size: int = Field(default=0, ge=0, le=65536, description="Per-device batch; 0 = batchSize.")
    max_length: int = Field(default=2048, ge=8, le=1 << 20)
    max_prompt_length: int = Field(default=1024, ge=4, le=1 << 20)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    lora: LoraSpec | None = None
    refinement: RefinementSpec = RefinementSpec()
    strategy: Literal["auto", "fsdp", "deepspeed", "ddp"] = Field(
        default="auto",
        description="How a train stage with several processes (one per GPU) shares the work: fsdp (FSDP2 full "
                    "shard), deepspeed (ZeRO-3, the paper's official recipe), ddp (a full copy per GPU); auto: "
                    "sharded (fsdp) for full-parameter training, ddp for LoRA.")
    checkpoint: CheckpointSpec = Field(
        default=CheckpointSpec(), description="When train stages save a sharded checkpoint (each rank its own shard, "
                                              "under the scratch volume) to resume from after a failure.")

    @model_validator(mode="after")
    def _lengths(self) -> TrainingSpec:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("maxPromptLength must be smaller than maxLength")
        return self


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=DNS_NAME)


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
    extra_body: OpaqueJSON | None = Field(
        default=None, max_length=16,
        description="Extra fields for every request, e.g. vLLM's {structured_outputs: {choice: [m, M]}} to hold a "
                    f"small judge to the two identifiers (at most 16 fields, {MAX_OPAQUE_JSON} bytes as JSON).")

    @field_validator("extra_body")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and opaque_size(v) > MAX_OPAQUE_JSON:
            raise ValueError(f"larger than {MAX_OPAQUE_JSON} bytes as JSON")
        return v


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
    length_control: Literal["minimal", "alpacaEvalV1"] = Field(
        default="minimal",
        description="The length-controlled win rate's GLM: minimal (alpaca_eval's length_controlled_minimal, for any "
                    "prompts; not comparable with the AlpacaEval leaderboard) or alpacaEvalV1 (alpaca_eval's "
                    "length_controlled_v1, the leaderboard's, with its per-instruction difficulty: only for the 805 "
                    "AlpacaEval instructions in their order; alpaca_eval downloads its weights from the Hugging Face "
                    "Hub).")
    judge: JudgeEndpointSpec

    @model_validator(mode="after")
    def _leaderboard_prompts(self) -> WinRateSpec:
        if self.length_control == "alpacaEvalV1" and self.samples not in (0, ALPACA_EVAL_INSTRUCTIONS):
            raise ValueError(f"lengthControl alpacaEvalV1 needs all {ALPACA_EVAL_INSTRUCTIONS} AlpacaEval "
                             f"instructions: samples must be 0 or {ALPACA_EVAL_INSTRUCTIONS}")
        return self


class EvaluationSpec(_Model):
    win_rate: WinRateSpec | None = Field(
        default=None, description="Win rate per iteration against a reference, judged by an LLM (AlpacaEval 2.0).")


GATE_METRICS = {"heldoutAgreement": "heldout_agreement", "winRate": "win_rate", "lcWinRate": "lc_win_rate"}
PERCENT_METRICS = ("winRate", "lcWinRate")
# k: a drop counts only when it exceeds k standard errors of the difference. With flat true quality and figures whose
# errors are independent, 2.6 stops a run of up to 5 gated iterations falsely < 5% of the time (1.3% at 3; the
# simulation is tests/test_gate.py::test_a_flat_run_rarely_stops); errors of one model measured on the same prompts
# are positively correlated, which makes the real rate lower still.
DEFAULT_DROP_STDERRS = 2.6


class GateSpec(_Model):
    metric: Literal["heldoutAgreement", "winRate", "lcWinRate"] = "heldoutAgreement"
    floor: float | None = Field(default=None, ge=0.0, le=100.0,
                                description="Stop when the metric falls below this (agreement 0-1, win rates %).")
    max_drop: float | None = Field(default=None, ge=0.0, le=100.0,
                                   description="Stop when the metric falls more than this below the best iteration "
                                               "(and by more than dropStderrs standard errors of the difference).")
    drop_stderrs: float = Field(default=DEFAULT_DROP_STDERRS, ge=0.0, le=10.0,
                                description="A drop counts only when it is larger than this many standard errors of "
                                            "the difference between the two iterations' figures (0: compare the "
                                            "figures alone). The default stops a run whose quality is flat falsely "
                                            "less than 5% of the time over up to 5 iterations.")
    max_length_change: float | None = Field(
        default=None, gt=0.0, le=10.0,
        description="Stop when the mean answer length (tokens) of an iteration's model on the win-rate prompts "
                    "differs from the SFT model's by more than this fraction, longer or shorter (0.3: beyond 0.7x "
                    "to 1.3x). Needs evaluation.winRate.")

    @model_validator(mode="after")
    def _some_rule(self) -> GateSpec:
        if self.floor is None and self.max_drop is None and self.max_length_change is None:
            raise ValueError("set floor, maxDrop and/or maxLengthChange")
        if self.metric in PERCENT_METRICS:
            # 0.5 for a win rate means 0.5%: a floor that never fires, a fraction written where percent is meant
            for name, value in (("floor", self.floor), ("maxDrop", self.max_drop)):
                if value is not None and 0 < value < 1:
                    raise ValueError(f"{self.metric} is in percent (0-100): {name} {value:g} means {value:g}%; "
                                     f"write {value * 100:g} for {value * 100:g}%")
        return self

    @property
    def manifest_key(self) -> str:
        return GATE_METRICS[self.metric]


class StorageSpec(_Model):
    uri: str = Field(min_length=1, max_length=MAX_URI, pattern=URI,
                     description="s3://bucket/prefix (in a cluster); spa run also takes a local path.")
    endpoint: str | None = Field(default=None, min_length=1, max_length=MAX_URI, pattern=URL)
    region: str | None = Field(default=None, min_length=1, max_length=64, pattern=REGION)
    secret_ref: SecretRef | None = None


class Toleration(_Model):
    """A Kubernetes Toleration, checked as the API server checks it."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "message": "value must be empty when operator is Exists"},
        {"rule": "has(self.key) || (has(self.operator) && self.operator == 'Exists')",
         "message": "operator must be Exists when key is empty"},
    ]

    key: str | None = Field(default=None, max_length=316, pattern=LABEL_KEY,
                            description="Taint key (a label key); absent with operator Exists: every taint.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, pattern=LABEL_VALUE,
                              description="Taint value (a label value); empty with operator Exists.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = Field(
        default=None, description="NoSchedule, PreferNoSchedule or NoExecute; absent: all effects.")
    toleration_seconds: int | None = Field(default=None, ge=0, le=MAX_COUNT,
                                           description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.key is None and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        return self


class EnvVar(_Model):
    """An environment variable of the stage pods (a plain value: never a reference to a Secret)."""

    name: str = Field(min_length=1, max_length=128, pattern=ENV_NAME, description="Variable name.")
    value: str = Field(default="", max_length=4096, description="Its value.")


def _reserved_env(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


class PodOverrides(_Model):
    """What a stage's pods may add to the pod the operator builds: the cluster's fast network, placement, scheduler.
    The chart sets the same fields once for every run (worker.podDefaults); a run's own entries win."""

    cel_rules: ClassVar[list[dict[str, str]]] = [
        {"rule": "!has(self.env) || self.env.all(e, !(e.name in [" + ", ".join(f"'{n}'" for n in RESERVED_ENV)
                 + "]) && " + " && ".join(f"!e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES) + ")",
         "message": "env: " + ", ".join(f"{p}*" for p in RESERVED_ENV_PREFIXES) + " and the rendezvous variables ("
                    + ", ".join(RESERVED_ENV) + ") are set by the operator", "fieldPath": ".env"},
        *({"rule": f"!has(self.{f}) || self.{f}.all(k, !k.matches('{RESERVED_KEY.replace(chr(92), chr(92) * 2)}'))",
           "message": f"{f}: keys of " + ", ".join(RESERVED_KEY_DOMAINS) + " and " + ", ".join(RESERVED_KEYS)
                      + " are reserved", "fieldPath": f".{f}"} for f in ("labels", "annotations")),
        {"rule": "!has(self.extraResources) || self.extraResources.all(k, (k.contains('/') || "
                 "k.startsWith('hugepages-')) && k != 'nvidia.com/gpu' && "
                 "!k.matches('^([^/]*\\\\.)?kubernetes\\\\.io/'))",
         "message": "extraResources: extended resources (a domain/name such as rdma/ib) or hugepages-*; GPUs are "
                    "gpus, CPU and memory their own fields", "fieldPath": ".extraResources"},
    ]

    env: list[EnvVar] | None = Field(default=None, max_length=64, description=(
        "Environment variables of the pods (NCCL_*, FI_*, ...). SPA_*, AWS_*, ACCELERATE_*, TORCHELASTIC_* and the "
        "rendezvous variables are the operator's."))
    annotations: dict[LabelKey, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=32, description="Pod annotations (e.g. k8s.v1.cni.cncf.io/networks for a secondary "
                                                 "RDMA network). Kubernetes', Kueue's, gang schedulers' and spa.dev "
                                                 "keys are reserved.")
    labels: dict[LabelKey, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        default=None, max_length=32, description="Pod labels (the same keys are reserved as for annotations).")
    extra_resources: dict[Annotated[str, Field(max_length=253, pattern=RESOURCE_NAME)],
                          Annotated[str, Field(max_length=64, pattern=QUANTITY)]] | None = Field(
        default=None, max_length=16, description=(
            "Extended resources each pod requests (request = limit), e.g. {\"rdma/ib\": \"1\"} or "
            "{\"vpc.amazonaws.com/efa\": \"32\"}, hugepages-2Mi: a quantity as a string."))
    node_selector: dict[LabelKey, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = Field(
        default=None, max_length=64)
    tolerations: list[Toleration] | None = Field(default=None, max_length=64)
    affinity: OpaqueJSON | None = Field(default=None, max_length=3, description=(
        "A Kubernetes Affinity (nodeAffinity, podAffinity, podAntiAffinity), e.g. to keep a gang in one network "
        "block; checked by the API server when the Job is created."))
    scheduler_name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME, pattern=DNS_NAME,
                                       description="The scheduler of the pods (default: the cluster's, or the gang "
                                                   "scheduler the operator is configured with for multi-node "
                                                   "stages).")
    capabilities: list[Annotated[str, Field(max_length=32, pattern=CAPABILITY)]] | None = Field(
        default=None, max_length=16, description=(
            "Linux capabilities added to the container (e.g. IPC_LOCK for RDMA memory registration); only those "
            "the operator allows (Helm worker.allowedCapabilities)."))

    @model_validator(mode="after")
    def _reserved(self) -> PodOverrides:
        for var in self.env or []:
            if _reserved_env(var.name):
                raise _FieldError("env", f"{var.name} is set by the operator (reserved: "
                                         f"{', '.join(p + '*' for p in RESERVED_ENV_PREFIXES)}, "
                                         f"{', '.join(RESERVED_ENV)})")
        for field in ("labels", "annotations"):
            for key in getattr(self, field) or {}:
                if re.search(RESERVED_KEY, key):
                    raise _FieldError(field, f"{key} is reserved (keys of {', '.join(RESERVED_KEY_DOMAINS)} and "
                                             f"{', '.join(RESERVED_KEYS)})")
        for name in self.extra_resources or {}:
            if name == "nvidia.com/gpu" or re.search(r"^([^/]*\.)?kubernetes\.io/", name) or not (
                    "/" in name or name.startswith("hugepages-")):
                raise _FieldError("extraResources", f"{name}: not an extended resource (a domain/name such as "
                                                    f"rdma/ib, or hugepages-*; GPUs are gpus, CPU and memory their "
                                                    f"own fields)")
        if self.affinity is not None:
            if not set(self.affinity) <= {"nodeAffinity", "podAffinity", "podAntiAffinity"}:
                raise _FieldError("affinity", "only nodeAffinity, podAffinity and podAntiAffinity")
            if opaque_size(self.affinity) > MAX_OPAQUE_JSON:
                raise _FieldError("affinity", f"larger than {MAX_OPAQUE_JSON} bytes")
        return self


class StageResources(PodOverrides):
    gpus: int = Field(default=0, ge=0, le=64)
    nodes: int = Field(default=1, ge=1, le=256,
                       description="Pods (nodes) that run one training stage together, each with `gpus` GPUs: an "
                                   "Indexed Job with a headless Service for the rendezvous. Only seedTrain and train "
                                   "may use more than 1.")
    scratch: str | None = Field(default=None, max_length=64, pattern=QUANTITY,
                                description="Local scratch space per pod (a quantity, e.g. \"200Gi\") for training "
                                            "checkpoints: an emptyDir with this sizeLimit and an ephemeral-storage "
                                            "request, mounted and passed to the worker as SPA_SCRATCH_DIR.")
    scratch_claim_size: str | None = Field(
        default=None, max_length=64, pattern=QUANTITY,
        description="Scratch as a per-pod PersistentVolumeClaim of this size instead of an emptyDir (a generic "
                    "ephemeral volume, deleted with the pod), for nodes whose local NVMe is not kubelet storage. "
                    "Replaces scratch.")
    scratch_storage_class: str | None = Field(default=None, min_length=1, max_length=MAX_NAME, pattern=DNS_NAME,
                                              description="StorageClass of scratchClaimSize (absent: the default).")
    cache_size: str | None = Field(default=None, max_length=64, pattern=QUANTITY,
                                   description="Size limit of the pod's model cache emptyDir (a quantity; also "
                                               "requested as ephemeral storage). Ignored with spec.modelCache.")
    shm_size: str | None = Field(default=None, max_length=64, pattern=QUANTITY,
                                 description="Size limit of /dev/shm (memory-backed; counts against the pod's "
                                             "memory). Absent: the pod's memory limit.")
    cpu: str | None = Field(default=None, max_length=64, pattern=QUANTITY)
    memory: str | None = Field(default=None, max_length=64, pattern=QUANTITY)
    image: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE, pattern=IMAGE)


class ResourcesSpec(_Model):
    seed_train: StageResources | None = Field(default=None, alias="seedTrain")
    generate: StageResources | None = None
    judge: StageResources | None = None
    train: StageResources | None = None
    evaluate: StageResources | None = None

    @model_validator(mode="after")
    def _nodes_only_for_training(self) -> ResourcesSpec:
        for name in SINGLE_NODE_STAGES:
            res = getattr(self, name)
            if res is not None and res.nodes > 1:
                raise _FieldError(f"{to_camel(name)}.nodes",
                                  "must be 1: only seedTrain and train run on several nodes")
        return self


class ModelCacheSpec(_Model):
    claim_name: str = Field(min_length=1, max_length=MAX_NAME, pattern=DNS_NAME,
                            description="A ReadWriteMany PersistentVolumeClaim in the run's namespace.")


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
    model_cache: ModelCacheSpec | None = Field(
        default=None, description="A shared model cache mounted by every stage pod instead of a per-pod emptyDir, "
                                  "so a run downloads each model once, not once per stage.")
    image: str | None = Field(default=None, min_length=1, max_length=MAX_IMAGE, pattern=IMAGE)
    image_pull_secrets: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=DNS_NAME)]] | None = Field(
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
        if self.gate and self.gate.metric == "heldoutAgreement":
            for name, value in (("floor", self.gate.floor), ("maxDrop", self.gate.max_drop)):
                if value is not None and value > 1:
                    raise _FieldError("gate", f"heldoutAgreement is a fraction (0-1): {name} {value:g} is above 1")
        if self.gate and self.gate.max_length_change is not None and not win:
            raise _FieldError("gate.maxLengthChange", "needs evaluation.winRate (its prompts are what the "
                                                      "iterations' models answer)")
        if self.storage and not (self.storage.uri.startswith("s3://") or "://" not in self.storage.uri):
            raise _FieldError("storage.uri", "must be s3://bucket/prefix or a local path")
        return self


def stage_resources(spec: AlignmentRunSpec, stage: str) -> StageResources:
    """The resources of a stage (`seed-train`, `train`, ...): its own entry, or the defaults.

    `validate` checks inputs only: a CPU-only pod on the run's image, whatever the GPU stages ask."""
    res = spec.resources
    field = {"seed-train": "seed_train"}.get(stage, stage)
    if res is None or field not in ResourcesSpec.model_fields:  # ("validate" is also a pydantic method name)
        return StageResources()
    return getattr(res, field) or StageResources()


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
        path = _loc_to_path(err["loc"])
        if isinstance(ctx_err, _FieldError):  # named relative to the model that raised it
            raise SpecError(f"{path}.{ctx_err.field}" if path else ctx_err.field, str(ctx_err), source) from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise SpecError(path or "(document)", msg, source) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML as the API server reads it: a duplicate key is an error (not "the last one wins"). Aliases are fine
    (kubectl expands them), but a document whose aliases expand past MAX_YAML_NODES nodes is refused: an alias bomb
    turns a few hundred bytes into gigabytes."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def expanded(n: Any) -> int:  # nodes after expanding every alias; shared subtrees are counted once each use
            if id(n) not in sizes:
                children = [c for kv in n.value for c in kv] if isinstance(n, yaml.MappingNode) else \
                    n.value if isinstance(n, yaml.SequenceNode) else []
                sizes[id(n)] = 1 + sum(expanded(c) for c in children)
            return sizes[id(n)]

        if node is not None and expanded(node) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_NODES} nodes (an alias bomb?)",
                node.start_mark)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_run(path: str | Path) -> AlignmentRun:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("(file)", "not found", str(path)) from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError("(document)", f"not valid YAML: {problem}{where}", str(path)) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise SpecError("kind", f"expected exactly one {KIND} document, found {len(runs)}", str(path))
    return parse_run(runs[0], str(path), strict=True)  # as strictly as the API server: "3" is not a number
