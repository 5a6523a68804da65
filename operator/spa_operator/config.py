"""The operator's settings: `Config`, read from the environment the Helm chart sets (`Config.from_env`)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from spa_operator import jobs
from spa_operator.runstore import RunStore
from spa_operator.spec import AlignmentRun, PodOverrides
from spa_operator.tenancy import Allowed
from spa_operator.worker_pod import GANG_SCHEDULERS, GangScheduling, PodDefaults


@dataclasses.dataclass
class Config:
    namespaces: list[str] = dataclasses.field(default_factory=list)  # empty: cluster-wide
    server: str | None = None  # API server URL without auth (tests); None: in-cluster or kubeconfig
    timer_s: float = 60.0  # safety net: reconcile each run at least this often
    progress_s: float = 15.0  # how often the running stage's heartbeat is read into status.progress
    retry_s: float = 10.0  # after a storage or API error
    worker_image: str = jobs.DEFAULT_WORKER_IMAGE
    worker_service_account: str | None = None  # for runs whose spec names none (the Helm chart's worker account)
    worker_metrics_port: int | None = None  # workers serve live metrics on this port; None: off
    # spec.storage for runs that name none (the Helm chart's `storage` values): uri, endpoint, region, secretRef.
    default_storage: dict[str, Any] | None = None
    metrics_port: int | None = 8080  # serves /metrics and /healthz; None: off
    metrics_host: str = "0.0.0.0"
    scanning: bool = True  # kopf's namespace/CRD scanning (off against API emulators)
    # Tests and benchmarks may replace storage access; (run, secret values) -> RunStore.
    store_factory: Callable[[AlignmentRun, dict[str, str] | None], RunStore] | None = None
    # A pod waiting this long (ImagePullBackOff, Unschedulable...) fails its attempt; None: never.
    pending_timeout_s: float | None = None
    queued_timeout_s: float | None = None  # the same for a Job Kueue has not admitted; None: never
    allowed_images: tuple[str, ...] = ()  # prefixes a run's own worker images must start with; empty: any
    allowed_judge_endpoints: tuple[str, ...] = ()  # URL prefixes (ending in / after the host); empty: any
    allowed_service_accounts: tuple[str, ...] = ()  # accounts a run may name; empty: none (the worker account)
    allowed_secrets: tuple[str, ...] = ()  # Secret names a run may reference; empty: any
    allowed_capabilities: tuple[str, ...] = ()  # Linux capabilities a run may add; empty: none
    pod_defaults: PodDefaults | None = None  # the chart's worker pod defaults (worker.podDefaults)
    gang_scheduling: GangScheduling | None = None  # the cluster's gang scheduler for multi-node stages; None: none
    platform_secret: str | None = None  # the default storage's Secret (Helm storage.secretName): always allowed
    # "namespace/name" of a coordination.k8s.io Lease: only the replica holding it acts (see lease.py); None: off.
    lease: str | None = None
    lease_duration_s: float = 15.0  # a holder silent this long is replaced
    lease_renew_s: float = 5.0  # how often the holder renews (and a candidate looks)
    identity: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_env(cls, **overrides: Any) -> Config:
        env = os.environ
        cfg = cls(timer_s=float(env.get("SPA_OPERATOR_TIMER_S", 60)),
                  progress_s=float(env.get("SPA_OPERATOR_PROGRESS_S", 15)),
                  retry_s=float(env.get("SPA_OPERATOR_RETRY_S", 10)),
                  worker_image=env.get("SPA_WORKER_IMAGE", jobs.DEFAULT_WORKER_IMAGE),
                  worker_service_account=env.get("SPA_WORKER_SERVICE_ACCOUNT") or None,
                  worker_metrics_port=int(env.get("SPA_WORKER_METRICS_PORT") or 0) or None,
                  default_storage=default_storage_from_env(env),
                  pending_timeout_s=float(env["SPA_PENDING_TIMEOUT_S"]) if env.get("SPA_PENDING_TIMEOUT_S") else None,
                  queued_timeout_s=float(env["SPA_QUEUED_TIMEOUT_S"]) if env.get("SPA_QUEUED_TIMEOUT_S") else None,
                  allowed_images=_list(env, "SPA_ALLOWED_IMAGES"),
                  allowed_judge_endpoints=_list(env, "SPA_ALLOWED_JUDGE_ENDPOINTS"),
                  allowed_service_accounts=_list(env, "SPA_ALLOWED_SERVICE_ACCOUNTS"),
                  allowed_secrets=_list(env, "SPA_ALLOWED_SECRETS"),
                  allowed_capabilities=_list(env, "SPA_ALLOWED_CAPABILITIES"),
                  pod_defaults=pod_defaults_from_env(env.get("SPA_WORKER_POD_DEFAULTS", "")),
                  gang_scheduling=gang_scheduling_from_env(env),
                  platform_secret=env.get("SPA_DEFAULT_STORAGE_SECRET") or None,
                  lease=env.get("SPA_LEASE") or None,
                  lease_duration_s=float(env.get("SPA_LEASE_DURATION_S") or 15),
                  lease_renew_s=float(env.get("SPA_LEASE_RENEW_S") or 5),
                  **({"identity": env["POD_NAME"]} if env.get("POD_NAME") else {}))
        return dataclasses.replace(cfg, **overrides)


    def allowed(self) -> Allowed:
        """The allow-lists as the decision core applies them (the default storage Secret is the operator's own)."""
        return Allowed(self.allowed_images, self.allowed_judge_endpoints, self.allowed_service_accounts,
                       self.allowed_secrets, self.allowed_capabilities,
                       (self.platform_secret,) if self.platform_secret else ())


class SettingError(ValueError):
    """An operator setting from the environment that cannot be used; the message names the variable."""


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(i.strip() for i in env.get(name, "").split(",") if i.strip())


def pod_defaults_from_env(text: str) -> PodDefaults | None:
    """SPA_WORKER_POD_DEFAULTS, JSON {"all": {...}, "gpu": {...}} (Helm worker.podDefaults), each part checked by
    the same model as a run's resources.<stage> overrides (reserved variables and keys are refused)."""
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SettingError(f"SPA_WORKER_POD_DEFAULTS: not JSON: {e}") from None
    if not isinstance(doc, dict) or not set(doc) <= {"all", "gpu"}:
        raise SettingError("SPA_WORKER_POD_DEFAULTS: expected an object with keys all and gpu")
    parts = {}
    for key in ("all", "gpu"):
        try:
            parts[key] = PodOverrides.model_validate(doc[key], strict=True) if doc.get(key) else None
        except ValidationError as e:
            err = e.errors()[0]
            ctx = (err.get("ctx") or {}).get("error")
            where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            field = getattr(ctx, "field", "") or where
            raise SettingError(f"SPA_WORKER_POD_DEFAULTS.{key}.{field}: "
                               f"{err['msg'].removeprefix('Value error, ')}") from None
    return PodDefaults(parts["all"], parts["gpu"])


def gang_scheduling_from_env(env: Mapping[str, str]) -> GangScheduling | None:
    """SPA_GANG_SCHEDULER (coscheduling | volcano), SPA_GANG_SCHEDULER_NAME, SPA_GANG_QUEUE (Helm
    worker.gangScheduling)."""
    kind = env.get("SPA_GANG_SCHEDULER", "").strip()
    if not kind:
        return None
    if kind not in GANG_SCHEDULERS:
        raise SettingError(f"SPA_GANG_SCHEDULER: {kind!r} is not one of {', '.join(GANG_SCHEDULERS)}")
    name = env.get("SPA_GANG_SCHEDULER_NAME", "").strip() or ("volcano" if kind == "volcano" else
                                                               "scheduler-plugins-scheduler")
    return GangScheduling(kind, name, env.get("SPA_GANG_QUEUE", "").strip() or None)  # type: ignore[arg-type]


def default_storage_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """spec.storage for runs without one, from SPA_DEFAULT_STORAGE_{URI,ENDPOINT,REGION,SECRET}; None if no URI."""
    uri = env.get("SPA_DEFAULT_STORAGE_URI")
    if not uri:
        return None
    out: dict[str, Any] = {"uri": uri}
    if env.get("SPA_DEFAULT_STORAGE_ENDPOINT"):
        out["endpoint"] = env["SPA_DEFAULT_STORAGE_ENDPOINT"]
    if env.get("SPA_DEFAULT_STORAGE_REGION"):
        out["region"] = env["SPA_DEFAULT_STORAGE_REGION"]
    if env.get("SPA_DEFAULT_STORAGE_SECRET"):
        out["secretRef"] = {"name": env["SPA_DEFAULT_STORAGE_SECRET"]}
    return out
