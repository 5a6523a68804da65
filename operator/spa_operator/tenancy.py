"""What a run may name, by the platform's allow-lists (Helm `worker.allowed*`). Pure.

Whoever may create an AlignmentRun makes the operator create pods in that namespace, with the operator's trusted
worker image. So everything a run names that could reach beyond its own work is checked against the chart's lists:
worker images (prefixes), the win-rate judge endpoint (the worker sends the judge's API key there), ServiceAccounts
(their tokens), Secrets (their values reach the pods as env) and added Linux capabilities. The chart's
ValidatingAdmissionPolicy refuses the same runs at admission (templates/admission-policy.yaml); this is the check of
record, so a run that gets past admission (policy off, an older cluster) fails with a condition naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from pydantic.alias_generators import to_camel

from spa_operator.spec import AlignmentRunSpec


@dataclasses.dataclass(frozen=True)
class Allowed:
    """The allow-lists. images, judge_endpoints and secrets: empty allows any. service_accounts and capabilities:
    empty allows none (a run's pods run as the chart's worker account, with no token and no added capability)."""

    images: tuple[str, ...] = ()  # prefixes, e.g. "registry.example.com/ml/"
    judge_endpoints: tuple[str, ...] = ()  # URL prefixes ending in "/" after the host: "http://judge.llm:8000/"
    service_accounts: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    trusted_secrets: tuple[str, ...] = ()  # the operator's own (its default storage Secret): always allowed


@dataclasses.dataclass(frozen=True)
class Violation:
    reason: str  # the Failed condition's reason
    field: str  # the manifest path of the field
    message: str


STAGE_FIELDS = ("seed_train", "generate", "judge", "train", "evaluate")


def endpoint_allowed(endpoint: str, prefixes: tuple[str, ...]) -> bool:
    """Whether an endpoint URL starts with one of the prefixes. Each prefix ends with a "/" after its host, so it
    pins scheme, host and port exactly ("http://judge:8000/" does not admit "http://judge:8000.evil.example/"),
    and "http://judge:8000" itself is compared as "http://judge:8000/"."""
    return any((endpoint + "/").startswith(p) for p in prefixes)


def images_of(spec: AlignmentRunSpec) -> Iterator[tuple[str, str]]:
    """(field, image) of every worker image the run names itself (the operator's default is trusted)."""
    if spec.image:
        yield "spec.image", spec.image
    for field in STAGE_FIELDS:
        res = getattr(spec.resources, field, None) if spec.resources else None
        if res is not None and res.image:
            yield f"spec.resources.{to_camel(field)}.image", res.image


def secrets_of(spec: AlignmentRunSpec) -> Iterator[tuple[str, str]]:
    """(field, Secret name) of every Secret the run names."""
    if spec.storage and spec.storage.secret_ref:
        yield "spec.storage.secretRef.name", spec.storage.secret_ref.name
    win = spec.evaluation.win_rate if spec.evaluation else None
    if win and win.judge.secret_ref:
        yield "spec.evaluation.winRate.judge.secretRef.name", win.judge.secret_ref.name
    for i, name in enumerate(spec.image_pull_secrets or []):
        yield f"spec.imagePullSecrets[{i}]", name


def violation(spec: AlignmentRunSpec, allowed: Allowed, default_service_account: str | None = None
              ) -> Violation | None:
    """The first thing the run names that the platform does not allow, or None."""
    if allowed.images:
        for field, image in images_of(spec):
            if not image.startswith(allowed.images):
                return Violation("ImageNotAllowed", field, f"image {image} is not allowed here (allowed: "
                                                           f"{', '.join(allowed.images)})")
    account = spec.service_account_name
    if account and account != default_service_account and account not in allowed.service_accounts:
        return Violation("ServiceAccountNotAllowed", "spec.serviceAccountName",
                         f"ServiceAccount {account} is not allowed here (allowed: "
                         f"{', '.join(allowed.service_accounts) or 'none; pods run as the worker account'})")
    win = spec.evaluation.win_rate if spec.evaluation else None
    if win and allowed.judge_endpoints and not endpoint_allowed(win.judge.endpoint, allowed.judge_endpoints):
        return Violation("JudgeEndpointNotAllowed", "spec.evaluation.winRate.judge.endpoint",
                         f"{win.judge.endpoint} is not allowed here (allowed: {', '.join(allowed.judge_endpoints)})")
    if allowed.secrets:
        for field, name in secrets_of(spec):
            if name not in allowed.secrets and name not in allowed.trusted_secrets:
                return Violation("SecretNotAllowed", field, f"Secret {name} is not allowed here (allowed: "
                                                            f"{', '.join(allowed.secrets)})")
    for field in STAGE_FIELDS:
        res = getattr(spec.resources, field, None) if spec.resources else None
        for cap in (res.capabilities or []) if res is not None else []:
            if cap not in allowed.capabilities:
                return Violation("CapabilityNotAllowed", f"spec.resources.{to_camel(field)}.capabilities",
                                 f"capability {cap} is not allowed here (allowed: "
                                 f"{', '.join(allowed.capabilities) or 'none'})")
    return None
