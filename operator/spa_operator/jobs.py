"""Planned stage + run metadata -> a batch/v1 Job manifest. Pure: no API calls, no clock.

The container runs exactly `spa-worker <stage args>`, the command the local executor runs, so one stage contract
serves both executors. Sharded stages become Indexed Jobs; the worker reads JOB_COMPLETION_INDEX itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from spa_workers import contract
from spa_workers.contract import EXIT_BAD_INPUT, JUDGE_API_KEY_ENV

from spa_operator.planner import PlannedStage
from spa_operator.spec import AlignmentRunSpec, StageResources

LABEL_RUN = "spa.dev/run"
LABEL_RUN_UID = "spa.dev/run-uid"
LABEL_ITERATION = "spa.dev/iteration"
LABEL_STAGE = "spa.dev/stage"
LABEL_ATTEMPT = "spa.dev/attempt"
ANNOTATION_STAGE_KEY = "spa.dev/stage-key"
ANNOTATION_RUN_NAME = "spa.dev/run-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER = "worker"
SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
CACHE_DIR = "/cache"
DEFAULT_WORKER_IMAGE = "ghcr.io/spa-operator/spa-worker:0.1.0"
MAX_NAME = 63  # Job names end up in the job-name label of their pods: a label value


@dataclass(frozen=True)
class RunRef:
    """What a Job needs to know about its AlignmentRun."""

    name: str
    namespace: str
    uid: str
    api_version: str = "spa.dev/v1alpha1"
    kind: str = "AlignmentRun"


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _clean(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower())


def fit(text: str, limit: int = MAX_NAME) -> str:
    """`text` as a DNS label of at most `limit` chars; a cut one ends with a hash of the whole."""
    text = _clean(text).strip("-")
    if len(text) <= limit:
        return text
    h = _short_hash(text)
    return f"{text[: limit - len(h) - 1].rstrip('-')}-{h}"


def run_label(run_name: str) -> str:
    """The `spa.dev/run` label value (label values are limited to 63 chars, run names are not)."""
    return fit(run_name)


def job_name(run_name: str, iteration: int, stage: str, attempt: int) -> str:
    """`<run>-i<ii>-<stage>-a<attempt>`; a long run name is cut and suffixed with its hash, the rest is kept."""
    suffix = f"-i{iteration:02d}-{stage}-a{attempt}"
    run = _clean(run_name).strip("-")
    if len(run) + len(suffix) <= MAX_NAME:
        return run + suffix
    h = _short_hash(run_name)
    keep = MAX_NAME - len(suffix) - len(h) - 1
    return f"{run[:keep].rstrip('-')}-{h}{suffix}"


def stage_resources(spec: AlignmentRunSpec, stage: str) -> StageResources:
    res = spec.resources
    field = {"seed-train": "seed_train"}.get(stage, stage)
    return (getattr(res, field) if res else None) or StageResources()


def worker_env(spec: AlignmentRunSpec, run: RunRef, stage: PlannedStage, attempt: int) -> list[dict[str, Any]]:
    """Container env: S3 settings, credentials by reference to the Secret (never by value), caches."""
    env: list[dict[str, Any]] = [
        {"name": "SPA_RUN", "value": run.name},
        {"name": "SPA_STAGE_KEY", "value": stage.key},
        {"name": "SPA_ATTEMPT", "value": str(attempt)},
        {"name": "SPA_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
    ]
    st = spec.storage
    if st and st.endpoint:
        env.append({"name": "SPA_S3_ENDPOINT", "value": st.endpoint})
    if st and st.region:
        env += [{"name": "AWS_REGION", "value": st.region}, {"name": "AWS_DEFAULT_REGION", "value": st.region}]
    if st and st.secret_ref:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": st.secret_ref.name, "key": key,
                                                              **({"optional": True} if optional else {})}}}
                for key, optional in SECRET_KEYS]
    win = spec.evaluation.win_rate if spec.evaluation else None
    if stage.stage == contract.EVALUATE and win and win.judge.secret_ref:
        ref = win.judge.secret_ref  # the judge's API key, by reference: its value never enters the Job spec
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _resources(res: StageResources) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = res.gpus
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def labels(run: RunRef, stage: PlannedStage, attempt: int) -> dict[str, str]:
    return {
        LABEL_RUN: run_label(run.name),
        LABEL_RUN_UID: run.uid,
        LABEL_ITERATION: str(stage.iteration),
        LABEL_STAGE: stage.stage,
        LABEL_ATTEMPT: str(attempt),
        "app.kubernetes.io/name": "spa-worker",
        "app.kubernetes.io/managed-by": "spa-operator",
    }


def owner_reference(run: RunRef) -> dict[str, Any]:
    return {"apiVersion": run.api_version, "kind": run.kind, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


def build_job(stage: PlannedStage, attempt: int, run: RunRef, spec: AlignmentRunSpec,
              default_image: str = DEFAULT_WORKER_IMAGE, default_service_account: str | None = None,
              metrics_port: int | None = None) -> dict[str, Any]:
    """The Job for one attempt of one stage. `attempt` numbers the stage's Jobs (1, 2, ...).

    default_service_account: used when the spec names none; metrics_port: the worker serves live Prometheus metrics
    there (SPA_WORKER_METRICS_PORT, a container port named "metrics" for a PodMonitor).
    """
    res = stage_resources(spec, stage.stage)
    meta_labels = labels(run, stage, attempt)
    pod_labels = dict(meta_labels)
    job_labels = dict(meta_labels)
    if spec.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    annotations = {ANNOTATION_STAGE_KEY: stage.key, ANNOTATION_RUN_NAME: run.name}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": res.image or spec.image or default_image,
        "command": ["spa-worker", *stage.args.to_argv()],
        "env": worker_env(spec, run, stage, attempt),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": CACHE_DIR}],
        # The worker's last lines (its one-line error) show in the pod status and `kubectl describe`.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if metrics_port:
        container["env"].append({"name": "SPA_WORKER_METRICS_PORT", "value": str(metrics_port)})
        container["ports"] = [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
    resources = _resources(res)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # torch/NCCL need more than the 64Mi default
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if spec.service_account_name or default_service_account:
        pod_spec["serviceAccountName"] = spec.service_account_name or default_service_account
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in res.tolerations]
    job_spec: dict[str, Any] = {
        # Retries are new attempts (new Jobs) decided by the operator, so each is named, counted and reported.
        "backoffLimit": 0,
        "activeDeadlineSeconds": spec.stage_deadline_seconds,
        "podFailurePolicy": {"rules": [
            # Bad input: retrying cannot help; the operator reads the Failed reason "PodFailurePolicy".
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
            # Preemption, eviction, node drain: start a new pod, do not count it against backoffLimit.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"metadata": {"labels": pod_labels, "annotations": dict(annotations)}, "spec": pod_spec},
    }
    if stage.shards > 1:
        job_spec.update(completionMode="Indexed", completions=stage.shards, parallelism=stage.shards)
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.queue_name:
        job_spec["suspend"] = True  # Kueue unsuspends the Job when it admits the workload
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(run.name, stage.iteration, stage.stage, attempt),
            "namespace": run.namespace,
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": job_spec,
    }


def build_stage_objects(stage: PlannedStage, attempt: int, run: RunRef, spec: AlignmentRunSpec,
                        default_image: str = DEFAULT_WORKER_IMAGE, default_service_account: str | None = None,
                        metrics_port: int | None = None) -> list[dict[str, Any]]:
    """Every object one attempt of one stage needs, in creation order (the Job last).

    The executor creates them in this order; `spa render` prints them.
    """
    return [build_job(stage, attempt, run, spec, default_image, default_service_account, metrics_port)]

