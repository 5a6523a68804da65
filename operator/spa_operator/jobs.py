"""Planned stage + run metadata -> the Kubernetes objects of one stage attempt. Pure: no API calls, no clock.

The container runs exactly `spa-worker <stage args>`, the command the local executor runs, so one stage contract
serves both executors. Sharded stages become Indexed Jobs; the worker reads JOB_COMPLETION_INDEX itself. A training
stage on several nodes is an Indexed Job too (one pod per node, JOB_COMPLETION_INDEX = node rank) plus a headless
Service that gives its pods stable DNS names for the rendezvous.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from spa_workers import contract
from spa_workers.contract import EXIT_BAD_INPUT, JUDGE_API_KEY_ENV

from spa_operator.planner import PlannedStage
from spa_operator.spec import AlignmentRunSpec, StageResources, stage_resources
from spa_operator.worker_pod import (
    GangScheduling,
    PodDefaults,
    apply_overrides,
    effective_overrides,
    join_gang,
    pod_group,
)

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
SCRATCH_DIR = "/scratch"
RENDEZVOUS_PORT = 29500
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on every pod of the Job
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


def job_name(run_name: str, iteration: int, stage: str, attempt: int, limit: int = MAX_NAME) -> str:
    """`<run>-i<ii>-<stage>-a<attempt>`; a long run name is cut and suffixed with its hash, the rest is kept."""
    suffix = f"-i{iteration:02d}-{stage}-a{attempt}"
    run = _clean(run_name).strip("-")
    # A name the rule had to change (`team.a`) gets its hash, so it cannot take the Job names of `team-a`.
    if len(run) + len(suffix) <= limit and run == run_name:
        return run + suffix
    h = _short_hash(run_name)
    keep = limit - len(suffix) - len(h) - 1
    return f"{run[:keep].rstrip('-')}-{h}{suffix}"


def gang_job_name(run_name: str, iteration: int, stage: str, attempt: int, nodes: int) -> str:
    """The name of a multi-node Job: short enough that its pods' hostnames `<job>-<index>` are DNS labels."""
    return job_name(run_name, iteration, stage, attempt, MAX_NAME - len(f"-{nodes - 1}"))


def service_name(job: str) -> str:
    """The headless Service of a multi-node Job: the Job's name (a Service name must start with a letter)."""
    return job if job[0].isalpha() else fit("s" + job)


def rendezvous_host(job: str) -> str:
    """Index 0's stable hostname: an Indexed Job's pod is `<job>-<index>`, in DNS under its subdomain Service."""
    return f"{job}-0.{service_name(job)}"


_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                   "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6,
                   "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def binary_quantity(value: Decimal) -> str:
    """A byte count as a quantity, in the largest binary unit that divides it ("260Gi", "1536Mi", "1000")."""
    n = int(value.to_integral_value(rounding="ROUND_CEILING"))
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        size = _QUANTITY_UNITS[unit]
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def quantity_value(q: str) -> Decimal:
    """A Kubernetes quantity ("200Gi", "1.5T", "1e9") as a number (the spec's pattern has checked its form)."""
    m = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9.]+|[KMGTPE]i|[numkMGTPE])?", q)
    if m is None:
        raise ValueError(f"not a quantity: {q!r}")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** Decimal(suffix[1:])
    return number * _QUANTITY_UNITS[suffix]


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
    res = stage_resources(spec, stage.stage)
    # what the pod requests, for the stage's ledger (accelerator- and CPU-seconds = request x wall time)
    env.append({"name": contract.REQUESTED_GPUS_ENV, "value": str(res.gpus)})
    if res.cpu:
        env.append({"name": contract.REQUESTED_CPUS_ENV, "value": f"{float(quantity_value(res.cpu)):g}"})
    if res.scratch or res.scratch_claim_size:
        env.append({"name": "SPA_SCRATCH_DIR", "value": SCRATCH_DIR})
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
    if stage.stage in (contract.EVALUATE, contract.VALIDATE) and win and win.judge.secret_ref:  # validate probes
        ref = win.judge.secret_ref  # the judge's API key, by reference: its value never enters the Job spec
        env.append({"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _resources(res: StageResources, spec: AlignmentRunSpec) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = res.gpus
    # The scheduler places the pod on a node with this much free local disk for its sized emptyDirs; no limit: an
    # emptyDir past its sizeLimit already evicts the pod, and the container's own writes are small.
    scratch = None if res.scratch_claim_size else res.scratch  # a claim is not node-local disk
    local_disk = [q for q in (scratch, None if spec.model_cache else res.cache_size) if q]
    if local_disk:
        requests["ephemeral-storage"] = binary_quantity(sum(quantity_value(q) for q in local_disk))
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


# The worker image runs as this non-root user (Dockerfile.worker); the pod refuses to start as root.
WORKER_UID = 10001


def security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) securityContext: non-root, no privilege escalation, no capabilities, RuntimeDefault seccomp
    (Pod Security "restricted"). The root filesystem stays writable: the worker and its libraries write caches."""
    pod = {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID, "fsGroup": WORKER_UID,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False}
    return pod, container


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


def gang_env(job: str) -> list[dict[str, Any]]:
    """What the pods of a multi-node Job need to meet: the launcher's static rendezvous at index 0, NCCL behaviour."""
    return [
        {"name": "SPA_RENDEZVOUS_HOST", "value": rendezvous_host(job)},
        {"name": "SPA_RENDEZVOUS_PORT", "value": str(RENDEZVOUS_PORT)},
        # A rank whose peer died must fail (and fail the Job) instead of waiting in a collective forever.
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]


def headless_service(job: str, run: RunRef, stage: PlannedStage, attempt: int) -> dict[str, Any]:
    """The DNS names of a multi-node Job's pods (`<job>-<index>.<service>`), so index 0 can host the rendezvous.

    Owned by the Job (its uid is filled in once the Job exists: `owned_by`), so it goes when the Job goes, with its
    ttlSecondsAfterFinished or a retry's deletion, not only with the run."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(job), "namespace": run.namespace, "labels": labels(run, stage, attempt),
                     "annotations": {ANNOTATION_STAGE_KEY: stage.key, ANNOTATION_RUN_NAME: run.name},
                     "ownerReferences": [job_owner_reference(job)]},
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: job},
            # Ranks resolve index 0 while it starts, before any readiness: publish addresses at once.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def _volumes(res: StageResources, spec: AlignmentRunSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): /dev/shm, the model cache, and scratch space when asked for."""
    # torch/NCCL need more shared memory than the 64Mi default; memory-backed, so it counts against the pod's memory.
    shm: dict[str, Any] = {"medium": "Memory", **({"sizeLimit": res.shm_size} if res.shm_size else {})}
    cache: dict[str, Any] = ({"persistentVolumeClaim": {"claimName": spec.model_cache.claim_name}}
                             if spec.model_cache else {"emptyDir": {"sizeLimit": res.cache_size} if res.cache_size
                                                                   else {}})
    volumes = [{"name": "dshm", "emptyDir": shm}, {"name": "cache", **cache}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cache", "mountPath": CACHE_DIR}]
    if res.scratch_claim_size:  # a generic ephemeral volume: a PVC made for the pod and deleted with it
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": res.scratch_claim_size}}}
        if res.scratch_storage_class:
            claim["storageClassName"] = res.scratch_storage_class
        volumes.append({"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": claim}}})
        mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})
    elif res.scratch:
        volumes.append({"name": "scratch", "emptyDir": {"sizeLimit": res.scratch}})
        mounts.append({"name": "scratch", "mountPath": SCRATCH_DIR})
    return volumes, mounts


def owner_reference(run: RunRef) -> dict[str, Any]:
    return {"apiVersion": run.api_version, "kind": run.kind, "name": run.name, "uid": run.uid,
            "controller": True, "blockOwnerDeletion": True}


# The Job's uid in the ownerReference of the objects that belong to one attempt (its Service, its pod group) until
# the Job exists: the executor creates the Job first and fills in its uid (`owned_by`); `spa render` shows this.
JOB_UID_PLACEHOLDER = "<uid of the Job>"


def job_owner_reference(job: str, uid: str = JOB_UID_PLACEHOLDER) -> dict[str, Any]:
    """An attempt's own objects are owned by its Job (no blockOwnerDeletion: that would need update on
    jobs/finalizers where OwnerReferencesPermissionEnforcement is on)."""
    return {"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": uid, "controller": True}


def owned_by(obj: dict[str, Any], job_uid: str) -> dict[str, Any]:
    """`obj` (a Service or pod group of an attempt) with its Job's uid in its ownerReference."""
    meta = obj["metadata"]
    refs = [dict(r, uid=job_uid) if r.get("kind") == "Job" else r for r in meta.get("ownerReferences", [])]
    return {**obj, "metadata": {**meta, "ownerReferences": refs}}


def build_job(stage: PlannedStage, attempt: int, run: RunRef, spec: AlignmentRunSpec,
              default_image: str = DEFAULT_WORKER_IMAGE, default_service_account: str | None = None,
              metrics_port: int | None = None, pod_defaults: PodDefaults | None = None,
              gang_scheduling: GangScheduling | None = None) -> dict[str, Any]:
    """The Job for one attempt of one stage. `attempt` numbers the stage's Jobs (1, 2, ...).

    default_service_account: used when the spec names none; metrics_port: the worker serves live Prometheus metrics
    there (SPA_WORKER_METRICS_PORT, a container port named "metrics" for a PodMonitor).
    A stage on several nodes is a gang: an Indexed Job with one pod per node, found by its headless Service
    (`headless_service`, created after it by `build_stage_objects`). pod_defaults: the chart's worker pod defaults;
    gang_scheduling: the cluster's gang scheduler, which then places a multi-node stage's pods all at once.
    """
    res = stage_resources(spec, stage.stage)
    gang = res.nodes > 1
    name = (gang_job_name(run.name, stage.iteration, stage.stage, attempt, res.nodes) if gang
            else job_name(run.name, stage.iteration, stage.stage, attempt))
    meta_labels = labels(run, stage, attempt)
    pod_labels = dict(meta_labels)
    job_labels = dict(meta_labels)
    if spec.queue_name:
        # Kueue admits the whole Job as one workload (all `parallelism` pods' resources at once, never part of a gang).
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    annotations = {ANNOTATION_STAGE_KEY: stage.key, ANNOTATION_RUN_NAME: run.name}
    volumes, mounts = _volumes(res, spec)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": res.image or spec.image or default_image,
        "command": ["spa-worker", *stage.args.to_argv()],
        "env": worker_env(spec, run, stage, attempt) + (gang_env(name) if gang else []),
        "volumeMounts": mounts,
        # The worker's last lines (its one-line error) show in the pod status and `kubectl describe`.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security_context()[1],
    }
    if metrics_port:
        container["env"].append({"name": "SPA_WORKER_METRICS_PORT", "value": str(metrics_port)})
        container["ports"] = [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]
    if gang:
        container.setdefault("ports", []).append(
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    resources = _resources(res, spec)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "securityContext": security_context()[0],
                                "containers": [container], "volumes": volumes}
    if gang:
        pod_spec["subdomain"] = service_name(name)  # hostname `<job>-<index>` (Indexed Job) + this = a DNS name
    if spec.service_account_name or default_service_account:
        pod_spec["serviceAccountName"] = spec.service_account_name or default_service_account
    if not spec.service_account_name:
        # Workers talk to S3, never to the API: no token, unless the run names an account (one the operator allows)
        # that is meant to have one.
        pod_spec["automountServiceAccountToken"] = False
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    template_meta = {"labels": pod_labels, "annotations": dict(annotations)}
    apply_overrides(pod_spec, container, template_meta, effective_overrides(res, pod_defaults))
    if gang and gang_scheduling is not None:
        join_gang(pod_spec, template_meta, name, gang_scheduling)
    job_spec: dict[str, Any] = {
        # Retries are new attempts (new Jobs) decided by the operator, so each is named, counted and reported.
        "backoffLimit": 0,
        "activeDeadlineSeconds": spec.stage_deadline_seconds,
        "podFailurePolicy": {"rules": [
            # Bad input: retrying cannot help; the operator reads the Failed reason "PodFailurePolicy".
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
            # Preemption, eviction, node drain. A lone pod: start a new one, not counted against backoffLimit. A gang:
            # fail the attempt at once, since the surviving ranks would wait for the lost one forever; the next
            # attempt resumes from the sharded checkpoint (`failed_by_bad_input` tells this from bad input).
            {"action": "FailJob" if gang else "Ignore",
             "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        # A replacement pod starts only once the one it replaces has ended (phase Failed), never while it is merely
        # terminating: on a node cut off from the API server that pod may still run and write to the same prefix.
        "podReplacementPolicy": "Failed",
        "template": {"metadata": template_meta, "spec": pod_spec},
    }
    if gang:
        job_spec.update(completionMode="Indexed", completions=res.nodes, parallelism=res.nodes)
    elif stage.shards > 1:
        job_spec.update(completionMode="Indexed", completions=stage.shards, parallelism=stage.shards)
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.queue_name:
        job_spec["suspend"] = True  # Kueue unsuspends the Job when it admits the workload
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(run)],
        },
        "spec": job_spec,
    }


def failed_by_bad_input(condition: dict[str, Any]) -> bool:
    """Whether a Job's Failed condition comes from the bad-input rule (exit code 2), not a gang's disruption rule.

    Both are FailJob rules (reason "PodFailurePolicy"); the Job controller names what matched in the message.
    """
    return condition.get("reason") == "PodFailurePolicy" and "DisruptionTarget" not in condition.get("message", "")


def build_stage_objects(stage: PlannedStage, attempt: int, run: RunRef, spec: AlignmentRunSpec,
                        default_image: str = DEFAULT_WORKER_IMAGE, default_service_account: str | None = None,
                        metrics_port: int | None = None, pod_defaults: PodDefaults | None = None,
                        gang_scheduling: GangScheduling | None = None) -> list[dict[str, Any]]:
    """Every object one attempt of one stage needs, in creation order: the Job first, then what it owns.

    The executor creates them in this order; `spa render` prints them. A multi-node stage's headless Service (and,
    with a gang scheduler, its pod group) is owned by the Job: `owned_by` fills in the Job's uid once it exists.
    Its pods wait for their names to resolve (and for the pod group) before they meet, so the Service may come a
    moment after the Job.
    """
    job = build_job(stage, attempt, run, spec, default_image, default_service_account, metrics_port, pod_defaults,
                    gang_scheduling)
    if not job["spec"]["template"]["spec"].get("subdomain"):
        return [job]
    name = job["metadata"]["name"]
    out = [job, headless_service(name, run, stage, attempt)]
    if gang_scheduling is not None:
        group = pod_group(name, run.namespace, job["spec"]["parallelism"], labels(run, stage, attempt),
                          {ANNOTATION_STAGE_KEY: stage.key, ANNOTATION_RUN_NAME: run.name}, gang_scheduling)
        group["metadata"]["ownerReferences"] = [job_owner_reference(name)]
        out.append(group)
    return out
