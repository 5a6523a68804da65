"""The CRD's CEL rules as a real API server judges them when the CRD is created (not only when a run is validated).

kube-apiserver converts the schema to CEL declarations (k8s.io/apiserver pkg/cel/common/schemas.go, SchemaDeclType):
a node with no type (x-kubernetes-preserve-unknown-fields, not int-or-string) is not exposed to CEL at all, nor is a
list or map of such nodes. A rule on such a node, or a rule reading one, is refused at CRD creation
(k8s.io/apiextensions-apiserver pkg/apis/apiextensions/validation: "unable to convert structural schema to CEL
declarations", or an undefined field at compile time). It then estimates every rule's worst-case cost from the
declared bounds: a string without maxLength counts as long as the whole request (3 MiB), a list without maxItems or
a map without maxProperties as many elements as fit in it; a rule over 10^7 (StaticEstimatedCostLimit), or rules
adding up to 10^8 for the CRD, are refused. cel-python (which evaluates the rules in these tests and in the emulator)
knows none of this, so these tests check it on the schema itself: every field a rule can read is exposed and bounded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import crdcheck
import pytest

CHAIN = re.compile(r"(?<![\w.])(self|oldSelf)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
# Reading a field only to test its presence or its size costs O(1): nothing below it is traversed.
CONSTANT_COST = ("has(", "size(")


def exposed(node: dict[str, Any]) -> bool:
    """Whether the API server declares this schema node to CEL (SchemaDeclType is not nil)."""
    if node.get("x-kubernetes-int-or-string"):
        return True
    kind = node.get("type")
    if kind == "array":
        return isinstance(node.get("items"), dict) and exposed(node["items"])
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return exposed(node["additionalProperties"])
    return kind in ("object", "string", "integer", "number", "boolean")


def child(node: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The exposed property `name` of an exposed object node, or None (CEL: undefined field)."""
    sub = (node.get("properties") or {}).get(name) if node.get("type") == "object" else None
    return sub if sub is not None and exposed(sub) else None


def rules(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """(path, node, rule) for every x-kubernetes-validations rule in the schema."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path, node, rule
    for name, sub in (node.get("properties") or {}).items():
        yield from rules(sub, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            yield from rules(node[key], path + suffix)


def reads(rule: str) -> Iterator[tuple[str, list[str], bool]]:
    """(self or oldSelf, the field chain read, whether what is below it is traversed) for every access."""
    for m in CHAIN.finditer(rule):
        fields = [f for f in m.group(2).split(".") if f]
        if rule[m.end():].startswith("(") and fields:  # self.env.all(...), self.uri.startsWith(...): a method
            fields.pop()
        before = rule[: m.start()]
        yield m.group(1), fields, not before.endswith(CONSTANT_COST)


def unbounded(node: dict[str, Any], path: str) -> Iterator[str]:
    """Paths below an exposed node whose size the cost estimator cannot bound."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        yield f"{path}: exposed with x-kubernetes-preserve-unknown-fields (its hidden contents are unbounded)"
    kind = node.get("type")
    if kind == "string" and "maxLength" not in node and "enum" not in node:
        yield f"{path}: string without maxLength"
    elif node.get("x-kubernetes-int-or-string") and "maxLength" not in node:
        yield f"{path}: int-or-string without maxLength"
    elif kind == "array":
        if "maxItems" not in node:
            yield f"{path}: list without maxItems"
        yield from unbounded(node["items"], path + "[]")
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        if "maxProperties" not in node:
            yield f"{path}: map without maxProperties"
        yield from unbounded(node["additionalProperties"], path + "{}")
    for name, sub in (node.get("properties") or {}).items():
        if exposed(sub):
            yield from unbounded(sub, f"{path}.{name}")


ALL_RULES = list(rules(crdcheck.schema()))


def test_the_crd_has_rules_to_check():
    assert len(ALL_RULES) >= 10


@pytest.mark.parametrize(("path", "node", "rule"), ALL_RULES, ids=[f"{p or '(root)'}:{i}" for i, (p, _, _) in
                                                                   enumerate(ALL_RULES)])
def test_every_rule_sits_on_and_reads_only_fields_the_api_server_exposes_to_cel(path, node, rule):
    assert exposed(node), f"{path or '(root)'}: a rule on a field CEL cannot see (no type): the CRD is refused"
    for var, fields, _ in reads(rule["rule"]):
        at = node
        for i, name in enumerate(fields):
            at = child(at, name)
            assert at is not None, (f"{path or '(root)'}: {var}.{'.'.join(fields[: i + 1])} is not a field CEL "
                                    f"can see (absent or untyped): the rule does not compile on an API server")


@pytest.mark.parametrize(("path", "node", "rule"), ALL_RULES, ids=[f"{p or '(root)'}:{i}" for i, (p, _, _) in
                                                                   enumerate(ALL_RULES)])
def test_every_field_a_rule_can_read_has_a_bound(path, node, rule):
    """maxLength on strings, maxItems on lists, maxProperties on maps, for everything a rule traverses: the root rule
    compares the whole spec with the old one, so that is every field of the spec."""
    problems = []
    for var, fields, traversed in reads(rule["rule"]):
        at = node
        for name in fields:
            at = child(at, name) or {}
        if traversed:
            problems += list(unbounded(at, f"{path}/{var}.{'.'.join(fields)}"))
    assert not problems, problems


def test_the_spec_equality_rule_reads_every_spec_field():
    """The immutability rule compares every spec field with its old value: the bounds test above covers the whole
    spec only because of it (if it changes, the test still covers what rules read)."""
    (root_rule,) = crdcheck.schema()["x-kubernetes-validations"]
    compared = {fields[1] for var, fields, traversed in reads(root_rule["rule"]) if traversed and len(fields) > 1}
    assert compared == {k for k, v in crdcheck.schema()["properties"]["spec"]["properties"].items()
                        if exposed(v)} - {"suspend"}


@pytest.mark.parametrize("field", ["evaluation.winRate.judge.extraBody", "resources.train.affinity"])
def test_free_form_objects_are_bounded_and_hidden_from_cel(field):
    node = crdcheck.schema()["properties"]["spec"]
    for name in field.split("."):
        node = node["properties"][name]
    assert node["type"] == "object" and node["maxProperties"] <= 16
    assert not exposed(node)  # its values are untyped: nothing inside it costs a rule anything


def test_the_checks_catch_what_the_api_server_refuses():
    """The checks themselves: an untyped field with a rule, a rule reading one, an unbounded string or list read."""
    untyped = {"x-kubernetes-preserve-unknown-fields": True}
    assert not exposed(untyped) and exposed({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    schema = {"type": "object", "properties": {"n": untyped, "s": {"type": "string"},
                                               "l": {"type": "array", "items": {"type": "string", "maxLength": 3}}}}
    assert child(schema, "n") is None and child(schema, "s") is not None
    assert [f for _, f, t in reads("has(self.n) && self.s == oldSelf.s && size(self.l) > 0")] == [["n"], ["s"],
                                                                                                 ["s"], ["l"]]
    assert [t for _, _, t in reads("has(self.n) && size(self.l) > 0 && self.l == []")] == [False, False, True]
    assert list(unbounded(schema, "")) == [".s: string without maxLength", ".l: list without maxItems"]
