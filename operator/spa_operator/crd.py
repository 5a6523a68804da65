"""The AlignmentRun CustomResourceDefinition, generated from the pydantic spec model (one source of truth).

`python -m spa_operator.crd > crds/alignmentrun.yaml` writes it; tests/operator/test_crd.py checks that the file is
up to date and that the schema and `parse_run` accept and reject the same manifests.

The pydantic model gives types, defaults, enums, ranges and lengths; this module adds what Kubernetes needs on top:
a description on every field (for `kubectl explain`), cluster-only rules (storage must be S3), CEL rules for what
OpenAPI cannot say (per-iteration lists, number-or-list fields, the immutable spec), the status schema and the
printer columns.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from spa_workers.contract import Ledger

from spa_operator import spec as S

GROUP, VERSION, KIND, PLURAL, SINGULAR = "spa.dev", "v1alpha1", "AlignmentRun", "alignmentruns", "alignmentrun"
SHORT_NAMES = ["arun"]

# Descriptions by manifest path below spec (pydantic descriptions are used where these are absent).
DOCS: dict[str, str] = {
    "": "What to align, on which data, with which hyperparameters, and where to put the artifacts.",
    "model": "The model to align.",
    "model.sft": "The SFT model π_init (s3://, hf://org/name[@rev] or a path in the image): first policy and the "
                 "judge's fixed reference.",
    "data": "Training and evaluation data (JSONL or Parquet; {prompt, chosen, rejected} or UltraFeedback chat shape).",
    "data.seed": "Gold (human-labelled) preference pairs that train the first DPO model.",
    "data.prompts": "Unlabelled prompts; iteration i takes the next promptsPerIteration[i] of them, in order.",
    "data.heldout": "Optional gold pairs never trained on; each model's implicit-reward agreement on them is "
                    "reported.",
    "iterations": "The SPA loop.",
    "iterations.count": "Number of SPA iterations after the seed DPO (paper: 3).",
    "iterations.promptsPerIteration": "Prompts per iteration: one integer for all iterations, or a list with one "
                                      "entry per iteration (default, paper: 8000, 20000, 30000; required when "
                                      "count > 3).",
    "generation": "Sampling of answers by the current policy.",
    "generation.responsesPerPrompt": "Answers sampled per prompt (the judge keeps the best and the worst).",
    "generation.temperature": "Sampling temperature.",
    "generation.topP": "Nucleus sampling probability mass.",
    "generation.maxNewTokens": "Maximum tokens per answer.",
    "generation.backend": "Generation engine: vllm (GPU) or transformers.",
    "generation.shards": "Pods of the generate Job (an Indexed Job when > 1); prompts are split between them.",
    "generation.seed": "Sampling seed (the iteration number is added).",
    "judge": "Direct preference judgment with the policy's implicit DPO reward.",
    "judge.pairing": "min-max: chosen = highest reward, rejected = lowest (paper); max-random: rejected is random.",
    "judge.reference": "Reference model of the implicit reward: initial = the SFT model (paper), previous = the "
                       "previous iteration's model.",
    "judge.backend": "Scoring engine: transformers or vllm.",
    "judge.shards": "Pods of the judge Job (an Indexed Job when > 1).",
    "training": "DPO and SPA self-refinement.",
    "training.beta": "DPO β (also scales the judge's reward).",
    "training.learningRate": "Optimiser learning rate.",
    "training.seedEpochs": "Epochs of DPO on the seed pairs.",
    "training.epochsPerIteration": "Epochs of DPO on each iteration's judged pairs.",
    "training.batchSize": "Global batch size (pairs per optimiser step).",
    "training.microBatchSize": "Per-device batch size; 0 means batchSize (gradient accumulation fills the rest).",
    "training.maxLength": "Maximum tokens of prompt + answer.",
    "training.maxPromptLength": "Maximum prompt tokens; must be smaller than maxLength.",
    "training.seed": "Training seed.",
    "training.lora": "Train LoRA adapters instead of all weights (absent: full fine-tuning).",
    "training.lora.r": "LoRA rank.",
    "training.lora.alpha": "LoRA alpha.",
    "training.lora.dropout": "LoRA dropout.",
    "training.refinement": "SPA's noise-aware self-refinement of the judged labels.",
    "training.refinement.enabled": "Turn self-refinement on (paper) or off (plain DPO on judged pairs).",
    "training.refinement.lowConfidenceFraction": "K: fraction of samples treated as low-confidence (the K-quantile "
                                                 "of recent margins is the threshold).",
    "training.refinement.smoothing": "α: label smoothing toward the reverse label for low-confidence samples.",
    "training.refinement.warmupFraction": "Fraction of optimiser steps without refinement (α = 0).",
    "training.refinement.window": "Number of recent margins the K-quantile is taken over.",
    "training.refinement.extrapolation": "λ of the extrapolated model used for noise detection: one number for all "
                                         "iterations or one per iteration (default 1/2^i: 0.5, 0.25, 0.125; 0 turns "
                                         "it off).",
    "storage": "Where stage outputs, manifests and models are written.",
    "storage.uri": "s3://bucket/prefix; a run writes under <uri>/<namespace>/<name>/<uid prefix>/.",
    "storage.endpoint": "S3 endpoint URL for S3-compatible stores (MinIO, Ceph, GCS interop); absent: AWS.",
    "storage.region": "S3 region.",
    "storage.secretRef": "Secret in the run's namespace with the S3 credentials, keys AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN); absent: the pods' own identity.",
    "storage.secretRef.name": "Name of the Secret.",
    "resources": "Per-stage pod resources and placement.",
    "image": "Worker image for every stage (default: the operator's configured worker image).",
    "imagePullSecrets": "Names of Secrets to pull the worker image with.",
    "serviceAccountName": "Service account of the stage pods.",
    "priorityClassName": "Priority class of the stage pods.",
    "queueName": "Kueue LocalQueue: Jobs are created suspended with the kueue.x-k8s.io/queue-name label and start "
                 "when Kueue admits them.",
    "suspend": "Pause the run: no new stage starts and running stage Jobs are suspended, their pods stopped (with "
               "queueName, through the Job's Kueue Workload: it is set inactive, Kueue evicts the Job, and it is "
               "set active again on resume, then queued). A paused attempt's pods start again on resume; it is "
               "not counted as a failure. The only field that may change once the run has started.",
    "maxRetriesPerStage": "Failed attempts of one stage retried before the run fails (preemptions do not count; "
                          "bad input, exit code 2, is never retried).",
    "ttlSecondsAfterFinished": "Delete each stage Job this long after it finished (absent: keep them until the run "
                               "is deleted).",
    "stageDeadlineSeconds": "activeDeadlineSeconds of each stage Job: a stage running longer fails (and is retried).",
    "evaluation": "What the evaluate stage measures besides held-out agreement.",
    "evaluation.winRate.maxNewTokens": "Maximum tokens per answer (policy and reference model).",
    "evaluation.winRate.temperature": "Sampling temperature of the answers (0 = greedy).",
    "evaluation.winRate.backend": "Answer sampling engine: vllm (GPU) or transformers.",
    "evaluation.winRate.judge": "The LLM judge, reached over the OpenAI-compatible chat API.",
    "evaluation.winRate.judge.secretRef.name": "Secret in the run's namespace.",
    "evaluation.winRate.judge.secretRef.key": "Key of the Secret that holds the API key.",
    "evaluation.winRate.judge.concurrency": "Judge requests in flight at once.",
    "evaluation.winRate.judge.maxRetries": "Retries per request, with backoff honouring Retry-After (timeouts, 429, "
                                           "5xx); a refused request (4xx) or an unusable reply fails the stage as "
                                           "bad input, a reply naming neither output is a refusal (not asked "
                                           "again).",
    "evaluation.winRate.judge.timeoutSeconds": "Timeout per request.",
    "gate.metric": "The figure the gate watches: heldoutAgreement (0-1), winRate or lcWinRate (percent).",
}
RESOURCE_DOCS = {
    "": "Resources of the {stage} stage's pods.",
    "gpus": "nvidia.com/gpu per pod.",
    "cpu": "CPU request and limit per pod (a Kubernetes quantity, e.g. \"8\" or \"500m\").",
    "memory": "Memory request and limit per pod (a quantity, e.g. \"64Gi\").",
    "nodeSelector": "Node labels the pods must match.",
    "tolerations": "Pod tolerations (Kubernetes Toleration objects).",
    "image": "Worker image for this stage (overrides spec.image).",
}

# Fields that are a number or a list of numbers. OpenAPI cannot say that structurally, so they have no type
# (x-kubernetes-preserve-unknown-fields), and a real API server exposes no untyped field to CEL: it refuses a CRD
# whose rule sits on one or reads one ("unable to convert structural schema to CEL declarations", k8s.io/apiserver
# pkg/cel/common/schemas.go SchemaDeclType). The operator checks them (parse_run) and fails such a run naming them.
NUMBER_OR_LIST = ("iterations.promptsPerIteration", "training.refinement.extrapolation")

# CEL rules the pydantic validators also enforce (parse_run), by the node they sit on.
NODE_RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {"rule": "!has(self.gate) || (has(self.gate.metric) && self.gate.metric != 'heldoutAgreement') || "
                 "has(self.data.heldout)",
         "message": "gate.metric heldoutAgreement needs data.heldout", "fieldPath": ".gate.metric"},
        {"rule": "!has(self.gate) || !has(self.gate.metric) || self.gate.metric == 'heldoutAgreement' || "
                 "(has(self.evaluation) && has(self.evaluation.winRate))",
         "message": "gate.metric winRate or lcWinRate needs evaluation.winRate", "fieldPath": ".gate.metric"},
        {"rule": "!has(self.gate) || !has(self.gate.maxLengthChange) || "
                 "(has(self.evaluation) && has(self.evaluation.winRate))",
         "message": "gate.maxLengthChange needs evaluation.winRate", "fieldPath": ".gate.maxLengthChange"},
    ],
    "gate": [
        {"rule": "has(self.floor) || has(self.maxDrop) || has(self.maxLengthChange)",
         "message": "set floor, maxDrop and/or maxLengthChange"},
        {"rule": "(has(self.metric) && self.metric != 'heldoutAgreement') || "
                 "((!has(self.floor) || double(self.floor) <= 1.0) && "
                 "(!has(self.maxDrop) || double(self.maxDrop) <= 1.0))",
         "message": "heldoutAgreement is a fraction (0-1): floor and maxDrop must be at most 1"},
        {"rule": "!has(self.metric) || self.metric == 'heldoutAgreement' || "
                 "((!has(self.floor) || double(self.floor) == 0.0 || double(self.floor) >= 1.0) && "
                 "(!has(self.maxDrop) || double(self.maxDrop) == 0.0 || double(self.maxDrop) >= 1.0))",
         "message": "winRate and lcWinRate are in percent (0-100): a floor or maxDrop below 1 means less than 1%"},
    ],
    "training": [
        {"rule": "self.maxPromptLength < self.maxLength", "message": "maxPromptLength must be smaller than maxLength"},
    ],
    "resources": [
        {"rule": f"!has(self.{stage}) || !has(self.{stage}.nodes) || self.{stage}.nodes == 1",
         "message": "must be 1: only seedTrain and train run on several nodes", "fieldPath": f".{stage}.nodes"}
        for stage in S.SINGLE_NODE_STAGES
    ],
    # Cluster-only (operator.validate_for_cluster checks the same): stage pods can only share S3 storage.
    "storage": [
        {"rule": "self.uri.startsWith('s3://')", "message": "must be s3://bucket/prefix in a cluster",
         "fieldPath": ".uri"},
    ],
}
# Nothing beyond the spec model is required: storage may come from the operator's default (Helm `storage` values).
CLUSTER_REQUIRED: dict[str, list[str]] = {}

IMMUTABLE_MESSAGE = "spec is immutable once the run has started (only spec.suspend may change)"


def _constraints(info: FieldInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in info.metadata:
        if isinstance(m, at.Ge):
            out["minimum"] = m.ge
        elif isinstance(m, at.Gt):
            out["minimum"], out["exclusiveMinimum"] = m.gt, True
        elif isinstance(m, at.Le):
            out["maximum"] = m.le
        elif isinstance(m, at.Lt):
            out["maximum"], out["exclusiveMaximum"] = m.lt, True
        elif isinstance(m, at.MinLen):
            out["minLength"] = m.min_length
        elif isinstance(m, at.MaxLen):
            out["maxLength"] = m.max_length
        elif getattr(m, "pattern", None):
            out["pattern"] = m.pattern
    return out


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return tp


def _unwrap_annotated(tp: Any) -> tuple[Any, dict[str, Any]]:
    if get_origin(tp) is typing.Annotated:
        base, *meta = get_args(tp)
        info = FieldInfo.merge_field_infos(*[m for m in meta if isinstance(m, FieldInfo)])
        return base, _constraints(info)
    return tp, {}


def _type_schema(tp: Any, path: str) -> dict[str, Any]:
    tp = _strip_optional(tp)
    tp, extra = _unwrap_annotated(tp)
    if path in NUMBER_OR_LIST:
        return {"x-kubernetes-preserve-unknown-fields": True}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _object_schema(tp, path)
    origin = get_origin(tp)
    if origin is Literal:
        return {"type": "string", "enum": list(get_args(tp))}
    if origin is list:
        (item,) = get_args(tp)
        return {"type": "array", "items": _type_schema(item, path + "[]"), **extra}
    if origin is dict:
        key, value = get_args(tp)
        if value is Any:  # a free-form object: its values are kept as sent and hidden from CEL (untyped)
            return {"type": "object", "additionalProperties": {"x-kubernetes-preserve-unknown-fields": True}}
        out = {"type": "object", "additionalProperties": _type_schema(value, path + "{}")}
        key_rules = _unwrap_annotated(key)[1]
        if "pattern" in key_rules:  # OpenAPI has no schema for keys: CEL checks them
            out["x-kubernetes-validations"] = [{
                "rule": f"self.all(k, size(k) <= {key_rules.get('maxLength', 253)} && "
                        f"k.matches('{key_rules['pattern']}'))",
                "message": "keys must be label keys (an optional DNS prefix/, then a name of up to 63 characters)"}]
        return out
    if tp is Any:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    simple = {str: "string", bool: "boolean", int: "integer", float: "number"}
    if tp in simple:
        return {"type": simple[tp], **extra}
    raise TypeError(f"{path}: no CRD mapping for {tp!r}")


def _describe(path: str) -> str:
    if path.startswith("resources."):
        stage, _, rest = path[len("resources."):].partition(".")
        return RESOURCE_DOCS[rest].format(stage=stage)
    return DOCS.get(path, "")


def _object_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        alias = info.alias or name
        sub = f"{path}.{alias}" if path else alias
        schema = _type_schema(info.annotation, sub)
        schema.update({k: v for k, v in _constraints(info).items()
                       if not (schema.get("type") == "array" and k in ("minLength", "maxLength"))})
        if schema.get("type") == "array":
            lengths = _constraints(info)
            if "maxLength" in lengths:
                schema["maxItems"] = lengths["maxLength"]
        if schema.get("type") == "object" and "additionalProperties" in schema and "maxLength" in schema:
            schema["maxProperties"] = schema.pop("maxLength")
        description = info.description or _describe(sub)
        if not description:
            raise ValueError(f"spec.{sub}: no description (add it to crd.DOCS)")
        schema = {"description": description, **schema}
        if info.is_required():
            required.append(alias)
        elif isinstance(info.default, BaseModel):
            schema["default"] = {}  # the API server then fills the nested defaults
        elif info.default is not None:
            schema["default"] = info.default
        props[alias] = schema
    out: dict[str, Any] = {"type": "object", "properties": props}
    required += CLUSTER_REQUIRED.get(path, [])
    if required:
        out["required"] = required
    rules = NODE_RULES.get(path, []) + list(getattr(model, "cel_rules", []))
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _immutable_rule(spec_props: list[str]) -> dict[str, str]:
    same = " && ".join(
        f"(has(self.spec.{p}) ? (has(oldSelf.spec.{p}) && self.spec.{p} == oldSelf.spec.{p}) : !has(oldSelf.spec.{p}))"
        for p in spec_props if p != "suspend")
    started = "has(oldSelf.status) && has(oldSelf.status.stages) && size(oldSelf.status.stages) > 0"
    return {"rule": f"!({started}) || ({same})", "message": IMMUTABLE_MESSAGE}


def _condition_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string", "description": "Ready, Progressing, Failed, Suspended or StorageReachable."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "Whether it holds."},
        "reason": {"type": "string", "description": "One-word CamelCase reason."},
        "message": {"type": "string", "description": "Human-readable details."},
        "lastTransitionTime": {"type": "string", "format": "date-time",
                               "description": "When status last changed."},
        "observedGeneration": {"type": "integer", "description": "metadata.generation it was computed from."},
    }}


def status_schema() -> dict[str, Any]:
    num = {"type": "number"}
    stage = {"type": "object", "properties": {
        "name": {"type": "string", "description": "Stage key, e.g. iter-01/judge."},
        "iteration": {"type": "integer", "description": "Iteration (0 = seed)."},
        "stage": {"type": "string", "description": "seed-train, generate, judge, train or evaluate."},
        "state": {"type": "string", "enum": ["Running", "Succeeded", "Failed"], "description": "Stage state."},
        "job": {"type": "string", "description": "Name of the stage's latest Job."},
        "attempts": {"type": "integer", "description": "Jobs created for this stage."},
        "failures": {"type": "integer", "description": "Failed attempts (preemptions are not failures)."},
        "reason": {"type": "string", "description": "Why the last attempt failed."},
        "startTime": {"type": "string", "format": "date-time", "description": "When the first Job was created."},
        "endTime": {"type": "string", "format": "date-time", "description": "When the stage finished."},
        "outputs": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "URIs of the stage's outputs (dir, and model for training stages)."},
        "metrics": {"type": "object", "additionalProperties": num,
                    "description": "Compact figures from the stage manifest (pairs, reward gap, loss, ...)."},
        "ledger": _ledger_schema("What the stage spent, summed over its shards (see `cost`)."),
        "ledgerEstimated": _estimated_schema("Ledger entries of the stage that are estimates, not counts."),
        "workSeconds": {"type": "number", "minimum": 0,
                        "description": "Seconds its slowest shard spent on the items it counts (the ETA's rates)."},
    }}
    return {"type": "object", "description": "Where the run stands (written by the operator).", "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed", "Suspended"],
                  "description": "Pending, Running, Succeeded, Failed or Suspended."},
        "iteration": {"type": "integer", "description": "Iteration of the current stage (0 = seed)."},
        "stage": {"type": "string", "description": "The current stage (the latest running one)."},
        "progress": {"type": "number", "minimum": 0, "maximum": 1,
                     "description": "Fraction done of the current stage, from the worker heartbeat."},
        "message": {"type": "string", "description": "One line on the current state."},
        "observedGeneration": {"type": "integer", "description": "metadata.generation the status reflects."},
        "startTime": {"type": "string", "format": "date-time", "description": "When the first Job was created."},
        "completionTime": {"type": "string", "format": "date-time", "description": "When the run finished."},
        "storagePrefix": {"type": "string", "description": "URI under which this run's stages write."},
        "conditions": {"type": "array", "items": _condition_schema(),
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                       "description": "Ready, Progressing, Failed, Suspended, StorageReachable."},
        "stages": {"type": "array", "items": stage, "description": "One entry per started stage."},
        "outputs": {"type": "object", "description": "The run's results (set when Succeeded; the same as the "
                                                          "PUBLISHED.json the run leaves in its storage).",
                    "properties": {
            "model": {"type": "string", "description": "URI of the published model."},
            "iteration": {"type": "integer", "description": "The iteration whose model is published (0 = seed)."},
            "reason": {"type": "string", "description": "Why: the quality gate's verdict, or that there is none."},
            "stoppedByGate": {"type": "boolean", "description": "Whether the quality gate stopped the run."}}},
        "cost": {"type": "object", "description": "What the run spent so far, from its stages' ledgers.",
                 "properties": {
                     "total": _ledger_schema("The run's ledger: gold labels, prompts, answers and tokens generated, "
                                             "pairs judged, tokens scored, pairs and tokens trained, accelerator- "
                                             "and CPU-seconds, storage bytes read and written, win-rate judge calls "
                                             "and tokens."),
                     "estimated": _estimated_schema("Totals that include an estimate (the rest are counted)."),
                 }},
        "progressPercentage": {"type": "integer", "minimum": 0, "maximum": 100,
                               "description": "Percent of the run done: its stages' time done over their time "
                                              "done and left (by stages done while the remaining time is unknown)."},
        "estimatedRemainingSeconds": {"type": "integer", "minimum": 0,
                                      "description": "Estimated seconds until the run ends, from the measured "
                                                     "rates of its finished stages; absent while unknown."},
        "estimatedRemaining": {"type": "string", "maxLength": 16,
                               "description": "The same for people: unknown (until a stage of every kind still to "
                                              "run has finished), 45s, 12m, 3h05m."},
    }}


def _ledger_schema(description: str) -> dict[str, Any]:
    return {"type": "object", "description": description, "maxProperties": len(Ledger.KEYS),
            "additionalProperties": {"type": "number", "minimum": 0}}


def _estimated_schema(description: str) -> dict[str, Any]:
    return {"type": "array", "description": description, "maxItems": len(Ledger.KEYS),
            "items": {"type": "string", "enum": list(Ledger.KEYS)}}


def open_api_schema() -> dict[str, Any]:
    spec_schema = _object_schema(S.AlignmentRunSpec, "")
    spec_schema["description"] = DOCS[""]
    return {
        "type": "object",
        "description": "An SPA self-alignment run: seed DPO, then generate → judge → train per iteration, on Jobs.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "spa.dev/v1alpha1"},
            "kind": {"type": "string", "description": "AlignmentRun"},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema,
            "status": status_schema(),
        },
        "x-kubernetes-validations": [_immutable_rule(list(spec_schema["properties"]))],
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": ["spa"]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Iteration", "type": "integer", "jsonPath": ".status.iteration"},
                    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                    {"name": "Progress", "type": "number", "format": "float", "jsonPath": ".status.progress"},
                    {"name": "Done %", "type": "integer", "jsonPath": ".status.progressPercentage"},
                    {"name": "ETA", "type": "string", "jsonPath": ".status.estimatedRemaining"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": open_api_schema()},
            }],
        },
    }


HEADER = "# Generated by `python -m spa_operator.crd` from operator/spa_operator/spec.py: do not edit by hand.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120, allow_unicode=True)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
