"""`spa render RUN.yaml`: every Kubernetes object the operator would create for the run, like `helm template`.

For each planned stage, in plan order, the objects of its first attempt (`jobs.build_stage_objects`, exactly what the
operator creates), as one multi-document YAML stream a user can review, diff or validate before applying the run.
The run's uid, which the API server assigns, is a placeholder unless the manifest carries one (it only shows in
labels, owner references and the storage prefix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from spa_operator import jobs, observe
from spa_operator.config import Config, gang_scheduling_from_env, pod_defaults_from_env
from spa_operator.fields import user_inputs
from spa_operator.inputs import is_local_path
from spa_operator.planner import stage_graph
from spa_operator.spec import AlignmentRun, load_run

PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def cluster_run(path: str, storage_uri: str | None = None) -> AlignmentRun:
    """The run in `path` as the operator would accept it (cluster rules: S3 storage); raises SpecError."""
    doc = load_run(path).model_dump(by_alias=True, exclude_none=True, mode="json")
    if storage_uri:
        doc["spec"]["storage"] = {**doc["spec"].get("storage", {}), "uri": storage_uri}
    return observe.validate_for_cluster(doc)


def local_path_warnings(run: AlignmentRun) -> list[str]:
    """One line per input given as a local path: a pod reads it from its own filesystem, not the machine rendering."""
    return [f"{field}: {uri} is a local path: the worker pods read it from their own filesystem (their image or a "
            "mounted volume), not from this machine; use s3:// (or hf:// for a model) for files that are here"
            for field, (uri, _) in user_inputs(run).items() if is_local_path(uri)]


def settings(pod_defaults_file: str | None, gang_scheduler: str | None) -> Config:
    """The operator's worker settings `spa render` was given: the chart's pod defaults (a YAML file as Helm's
    worker.podDefaults) and gang scheduler. Raises ValueError (SettingError) or OSError with one line."""
    env = {"SPA_GANG_SCHEDULER": gang_scheduler or ""}
    if pod_defaults_file:
        env["SPA_WORKER_POD_DEFAULTS"] = json.dumps(yaml.safe_load(Path(pod_defaults_file).read_text()) or {})
    return Config(pod_defaults=pod_defaults_from_env(env.get("SPA_WORKER_POD_DEFAULTS", "")),
                  gang_scheduling=gang_scheduling_from_env(env))


def stage_objects(run: AlignmentRun, worker_image: str | None = None, service_account: str | None = None,
                  cfg: Config | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """(stage key, objects of its first attempt) for every stage of the run, in plan order."""
    meta = run.metadata
    ref = jobs.RunRef(name=meta.name, namespace=meta.namespace, uid=meta.uid or PLACEHOLDER_UID)
    assert run.spec.storage is not None  # cluster_run made sure
    root = observe.run_root(run.spec.storage.uri, meta.namespace, meta.name, ref.uid)
    image = worker_image or jobs.DEFAULT_WORKER_IMAGE
    cfg = cfg or Config()
    return [(s.key, jobs.build_stage_objects(s, 1, ref, run.spec, image, service_account, None, cfg.pod_defaults,
                                             cfg.gang_scheduling))
            for s in stage_graph(run.spec, root)]


def render(run: AlignmentRun, worker_image: str | None = None, service_account: str | None = None,
           cfg: Config | None = None) -> str:
    """The objects as a YAML stream, each stage's headed by a comment naming it."""
    parts = []
    for key, objects in stage_objects(run, worker_image, service_account, cfg):
        for obj in objects:
            parts.append(f"# stage {key}: {obj['kind']} {obj['metadata']['name']}\n"
                         + yaml.safe_dump(obj, sort_keys=False, width=120))
    return "---\n" + "---\n".join(parts)
