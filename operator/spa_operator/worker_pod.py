"""What a platform and a run add to the worker pod the operator builds, and the gang scheduler's pod group. Pure.

A stage's pod gets, in this order, each later one winning: the chart's defaults for every worker pod, the chart's
defaults for pods with GPUs (the fabric: `rdma/ib`, EFA, NCCL variables, IPC_LOCK), then the run's own
`resources.<stage>` overrides. Reserved variables and keys never get here: the spec model refuses them (the chart's
defaults are parsed by the same model when the operator starts).

Without Kueue a multi-node stage can be gang-scheduled by a scheduler that has pod groups: the scheduler-plugins
coscheduling plugin (PodGroup scheduling.x-k8s.io/v1alpha1, pods labelled scheduling.x-k8s.io/pod-group) or Volcano
(PodGroup scheduling.volcano.sh/v1beta1, pods annotated scheduling.k8s.io/group-name). Either holds every pod of the
gang until all of them fit, so a half-placed gang never holds GPUs for the rendezvous timeout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from spa_operator.spec import PodOverrides, StageResources

COSCHEDULING = "coscheduling"
VOLCANO = "volcano"
GANG_SCHEDULERS = (COSCHEDULING, VOLCANO)
COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"
VOLCANO_ANNOTATION = "scheduling.k8s.io/group-name"
# How long (s) the coscheduling plugin keeps a gang's pods waiting for the rest before it rejects them all.
COSCHEDULING_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class GangScheduling:
    """The cluster's gang scheduler, if the platform has one (Helm worker.gangScheduling)."""

    kind: Literal["coscheduling", "volcano"]
    scheduler_name: str  # the pods' schedulerName: the second scheduler coscheduling runs in, or "volcano"
    queue: str | None = None  # Volcano queue of the pod groups


@dataclasses.dataclass(frozen=True)
class PodDefaults:
    """The chart's worker pod defaults: for every stage pod, and in addition for pods that request GPUs."""

    all: PodOverrides | None = None
    gpu: PodOverrides | None = None


def effective_overrides(res: StageResources, defaults: PodDefaults | None) -> PodOverrides:
    """The chart's defaults merged with the stage's own overrides (maps by key, env by name; lists of tolerations
    and capabilities add up; affinity and schedulerName: the most specific one)."""
    layers = [layer for layer in ((defaults.all, defaults.gpu if res.gpus else None) if defaults else ())
              if layer is not None]
    layers.append(res)
    out: dict[str, Any] = {}
    for layer in layers:
        for field in ("annotations", "labels", "extra_resources", "node_selector"):
            value = getattr(layer, field)
            if value:
                out[field] = {**out.get(field, {}), **value}
        if layer.env:
            names = {e.name for e in layer.env}
            out["env"] = [e for e in out.get("env", []) if e.name not in names] + list(layer.env)
        for field in ("tolerations", "capabilities"):
            value = getattr(layer, field)
            if value:
                out[field] = list(dict.fromkeys([*out.get(field, []), *value]))
        for field in ("affinity", "scheduler_name"):
            if getattr(layer, field) is not None:
                out[field] = getattr(layer, field)
    return PodOverrides.model_construct(**out)


def apply_overrides(pod: dict[str, Any], container: dict[str, Any], template_meta: dict[str, Any],
                    over: PodOverrides) -> None:
    """Put the overrides into the pod template (in place). The operator's env entries of the same name give way
    (only unreserved ones, such as NCCL_DEBUG, can be named)."""
    if over.env:
        names = {e.name for e in over.env}
        container["env"] = [e for e in container["env"] if e["name"] not in names] + [
            {"name": e.name, "value": e.value} for e in over.env]
    if over.extra_resources:
        resources = container.setdefault("resources", {})
        for part in ("requests", "limits"):  # extended resources: the request must equal the limit
            resources.setdefault(part, {}).update(over.extra_resources)
    if over.capabilities:
        container["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": list(over.capabilities)}
    for field in ("labels", "annotations"):
        if getattr(over, field):
            template_meta[field] = {**getattr(over, field), **template_meta.get(field, {})}
    if over.node_selector:
        pod["nodeSelector"] = dict(over.node_selector)
    if over.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in over.tolerations]
    if over.affinity:
        pod["affinity"] = dict(over.affinity)
    if over.scheduler_name:
        pod["schedulerName"] = over.scheduler_name


def join_gang(pod: dict[str, Any], template_meta: dict[str, Any], group: str, gang: GangScheduling) -> None:
    """Make the pods of a multi-node Job members of its pod group `group` (in place). A schedulerName the run or
    the chart set wins over the gang scheduler's (the platform knows which scheduler runs the plugin)."""
    pod.setdefault("schedulerName", gang.scheduler_name)
    if gang.kind == COSCHEDULING:
        template_meta.setdefault("labels", {})[COSCHEDULING_LABEL] = group
    else:
        template_meta.setdefault("annotations", {})[VOLCANO_ANNOTATION] = group


def pod_group(name: str, namespace: str, members: int, labels: dict[str, str], annotations: dict[str, str],
              gang: GangScheduling) -> dict[str, Any]:
    """The pod group of a multi-node Job: all `members` pods are placed together or not at all."""
    meta = {"name": name, "namespace": namespace, "labels": dict(labels), "annotations": dict(annotations)}
    if gang.kind == COSCHEDULING:
        return {"apiVersion": "scheduling.x-k8s.io/v1alpha1", "kind": "PodGroup", "metadata": meta,
                "spec": {"minMember": members, "scheduleTimeoutSeconds": COSCHEDULING_TIMEOUT_S}}
    spec: dict[str, Any] = {"minMember": members}
    if gang.queue:
        spec["queue"] = gang.queue
    return {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup", "metadata": meta, "spec": spec}
