"""`spa explain FIELD`: the AlignmentRun field reference, read from the same OpenAPI schema as the CRD (so it says
what `kubectl explain alignmentrun.FIELD` says on a cluster, without one)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from spa_operator import crd
from spa_operator.spec import SpecError


def _type_name(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-preserve-unknown-fields") and "type" not in schema:
        return "number or list"
    kind = schema.get("type", "object")
    if kind == "array":
        return f"[]{_type_name(schema.get('items', {}))}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type_name(schema['additionalProperties'])}"
    return str(kind)


def lookup(path: str) -> tuple[str, dict[str, Any]]:
    """(canonical path, schema) of a field given as `spec.training.beta`, `training.beta` or
    `alignmentrun.spec.training.beta`; raises SpecError naming the first unknown part."""
    parts = [p for p in path.strip().split(".") if p]
    if parts and parts[0].lower() in ("alignmentrun", "alignmentruns"):
        parts = parts[1:]
    root = crd.open_api_schema()
    if parts and parts[0] not in root["properties"]:
        parts = ["spec", *parts]  # `training.beta` means spec.training.beta
    schema, seen = root, []
    for part in parts:
        while schema.get("type") == "array":
            schema = schema.get("items", {})
        props = schema.get("properties", {})
        if part not in props:
            where = ".".join(seen) or "AlignmentRun"
            known = ", ".join(props) or "none: it has no sub-fields"
            raise SpecError(".".join([*seen, part]), f"no such field (fields of {where}: {known})")
        schema = props[part]
        seen.append(part)
    return ".".join(seen), schema


def _facts(schema: dict[str, Any]) -> list[str]:
    facts = []
    if "default" in schema and schema["default"] != {}:
        facts.append(f"default: {json.dumps(schema['default'])}")
    if "enum" in schema:
        facts.append("one of: " + ", ".join(map(str, schema["enum"])))
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None:
        facts.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {low}")
    if high is not None:
        facts.append(f"{'<' if schema.get('exclusiveMaximum') else '<='} {high}")
    if "maxLength" in schema:
        facts.append(f"at most {schema['maxLength']} characters")
    if "pattern" in schema:
        facts.append(f"pattern: {schema['pattern']}")
    return facts


def render(path: str) -> str:
    name, schema = lookup(path)
    lines = [f"FIELD: {name or 'AlignmentRun'} <{_type_name(schema)}>"]
    facts = _facts(schema)
    if facts:
        lines.append("      " + "; ".join(facts))
    lines += ["", "DESCRIPTION:", textwrap.indent(textwrap.fill(schema.get("description", "") or "-", 100), "  ")]
    item = schema
    while item.get("type") == "array":
        item = item.get("items", {})
    props = item.get("properties", {})
    if props:
        required = set(item.get("required", []))
        lines += ["", "FIELDS:"]
        for key, sub in props.items():
            flag = "  -required-" if key in required else ""
            lines.append(f"  {key} <{_type_name(sub)}>{flag}")
            lines.append(textwrap.indent(textwrap.fill(sub.get("description", "") or "-", 96), "    "))
    return "\n".join(lines)
