"""What the API server does with an AlignmentRun and the CRD in crds/: apply defaults, validate the structural schema
(jsonschema, OpenAPI 3.0 = draft 4 semantics) and evaluate the CEL rules (cel-python).

Used by the CRD tests and by the API emulator of the integration tests, so both see the cluster's behaviour.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

logging.getLogger("celpy").setLevel(logging.WARNING)  # it logs every evaluation at DEBUG

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "alignmentrun.yaml"


@functools.cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(node_schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, as the API server does it: absent fields with a default get it, recursively."""
    if isinstance(value, dict) and node_schema.get("type") == "object":
        props = node_schema.get("properties", {})
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = node_schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in list(value):
                if key not in props:
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and "items" in node_schema:
        return [apply_defaults(node_schema["items"], v) for v in value]
    return value


def defaulted(doc: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(schema(), copy.deepcopy(doc))


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _error_path(e: jsonschema.ValidationError) -> str:
    path = _path(e.absolute_path)
    if e.validator == "required":  # reported on the parent: name the missing field itself
        missing = e.message.split("'")[1]
        path = f"{path}.{missing}" if path else missing
    return path or "(root)"


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(schema())


@functools.cache
def warm() -> None:
    """Compile every CEL rule of the CRD (seconds, once per process): the emulator does it before it serves, so its
    first create of a run does not hold its event loop (and every client's requests, Lease renewals included) that
    long, which no API server does."""
    def rules(node: Any) -> Any:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                yield rule["rule"]
            for value in node.values():
                yield from rules(value)
        elif isinstance(node, list):
            for value in node:
                yield from rules(value)

    _validator()
    for rule in rules(schema()):
        _program(rule)


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel(rule: str, **values: Any) -> bool:
    result = _program(rule).evaluate({k: celpy.json_to_cel(v) for k, v in values.items()})
    return bool(result) and not isinstance(result, celpy.CELEvalError)


def _cel_errors(node_schema: dict[str, Any], value: Any, path: str, old: Any = None,
                transition: bool = False) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for rule in node_schema.get("x-kubernetes-validations", []):
        uses_old = "oldSelf" in rule["rule"]
        if uses_old != transition:
            continue
        ok = _cel(rule["rule"], self=value, oldSelf=old) if uses_old else _cel(rule["rule"], self=value)
        if not ok:
            where = path + rule.get("fieldPath", "")
            errors.append((where or "(root)", rule.get("message", rule["rule"])))
    if isinstance(value, dict):
        for key, sub in node_schema.get("properties", {}).items():
            if key in value:
                sub_old = old.get(key) if isinstance(old, dict) else None
                errors += _cel_errors(sub, value[key], f"{path}.{key}" if path else key, sub_old, transition)
    elif isinstance(value, list) and "items" in node_schema:
        for i, v in enumerate(value):
            errors += _cel_errors(node_schema["items"], v, f"{path}[{i}]", None, transition)
    return errors


INT64 = (-(2**63), 2**63 - 1)


def _out_of_int64(value: Any, path: str) -> list[tuple[str, str]]:
    """The API server decodes JSON integers as int64 and refuses larger ones; celpy would overflow on them."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [] if INT64[0] <= value <= INT64[1] else [(path or "(root)", "integer out of the int64 range")]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _out_of_int64(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _out_of_int64(v, f"{path}[{i}]")]
    return []


def errors(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, message) for everything the API server would reject in a new AlignmentRun (after defaulting)."""
    doc = defaulted(doc)
    overflow = _out_of_int64(doc, "")
    if overflow:  # refused when the request is decoded, before any schema check
        return [(p.rsplit("[", 1)[0] if p.endswith("]") else p, m) for p, m in overflow]
    out = [(_error_path(e), e.message) for e in _validator().iter_errors(doc)]
    if not out:  # the API server evaluates CEL rules only on schema-valid objects
        out = _cel_errors(schema(), doc, "")
    return out


def update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """Errors for an update: the schema on the new object, then the transition rules (oldSelf)."""
    out = errors(new)
    return out or _cel_errors(schema(), defaulted(new), "", defaulted(old), transition=True)
