"""The CRD: generated from the spec model, structural, documented; it and the operator reject the same invalid runs
naming the same field, and valid runs get the documented (paper) defaults."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import crdcheck
import pytest
import yaml
from spa_operator import config, crd
from spa_operator.kube import validate_for_cluster
from spa_operator.spec import SpecError, parse_run

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {
    "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r1", "namespace": "ns"},
    "spec": {"model": {"sft": "s3://models/sft"},
             "data": {"seed": "s3://data/seed.jsonl", "prompts": "s3://data/prompts.jsonl"},
             "storage": {"uri": "s3://bucket/runs"}},
}
_DEL = object()


def with_(*changes: tuple[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for path, value in changes:
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is _DEL:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return doc


# (manifest, the field both the API server and the operator must name)
INVALID = [
    (with_(("spec.model", _DEL)), "spec.model"),
    (with_(("spec.model.sft", "")), "spec.model.sft"),
    (with_(("spec.data.prompts", _DEL)), "spec.data.prompts"),
    (with_(("spec.iterations", {"count": -1})), "spec.iterations.count"),
    (with_(("spec.iterations", {"count": 51, "promptsPerIteration": 1})), "spec.iterations.count"),
    (with_(("spec.iterations", {"count": "3"})), "spec.iterations.count"),
    (with_(("spec.iterations", {"count": 2, "promptsPerIteration": [100]})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.iterations", {"count": 2, "promptsPerIteration": 0})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.iterations", {"count": 2, "promptsPerIteration": "many"})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.iterations", {"count": 5})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.generation.responsesPerPrompt", 1)), "spec.generation.responsesPerPrompt"),
    (with_(("spec.generation.temperature", 6)), "spec.generation.temperature"),
    (with_(("spec.generation.topP", 0)), "spec.generation.topP"),
    (with_(("spec.generation.backend", "tgi")), "spec.generation.backend"),
    (with_(("spec.generation.shards", 0)), "spec.generation.shards"),
    (with_(("spec.generation.maxNewTokens", 0)), "spec.generation.maxNewTokens"),
    (with_(("spec.judge.pairing", "random")), "spec.judge.pairing"),
    (with_(("spec.training.beta", 0)), "spec.training.beta"),
    (with_(("spec.training.learningRate", -1e-5)), "spec.training.learningRate"),
    (with_(("spec.training.batchSize", 1.5)), "spec.training.batchSize"),
    (with_(("spec.training.maxPromptLength", 4096)), "spec.training"),
    (with_(("spec.training.refinement.smoothing", 0.5)), "spec.training.refinement.smoothing"),
    (with_(("spec.training.refinement.extrapolation", [0.5])), "spec.training.refinement.extrapolation"),
    (with_(("spec.training.refinement.extrapolation", -1)), "spec.training.refinement.extrapolation"),
    (with_(("spec.training.lora", {"r": 0})), "spec.training.lora.r"),
    (with_(("spec.storage.uri", "/mnt/runs")), "spec.storage.uri"),
    (with_(("spec.storage.uri", "gs://bucket/runs")), "spec.storage.uri"),
    (with_(("spec.storage.secretRef", {"name": ""})), "spec.storage.secretRef.name"),
    (with_(("spec.resources", {"train": {"gpus": -1}})), "spec.resources.train.gpus"),
    (with_(("spec.resources", {"train": {"memory": "lots"}})), "spec.resources.train.memory"),
    (with_(("spec.resources", {"generate": {"nodes": 2}})), "spec.resources.generate.nodes"),
    (with_(("spec.resources", {"train": {"nodes": 0}})), "spec.resources.train.nodes"),
    (with_(("spec.resources", {"train": {"scratch": "big"}})), "spec.resources.train.scratch"),
    (with_(("spec.training.strategy", "zero3")), "spec.training.strategy"),
    (with_(("spec.training.checkpoint", {"everySteps": -1})), "spec.training.checkpoint.everySteps"),
    (with_(("spec.modelCache", {"claimName": "Not_A_Name"})), "spec.modelCache.claimName"),
    (with_(("spec.maxRetriesPerStage", 21)), "spec.maxRetriesPerStage"),
    (with_(("spec.suspend", "yes")), "spec.suspend"),
    (with_(("spec.queueName", "Bad_Queue")), "spec.queueName"),
    (with_(("spec.imagePullSecrets", [f"s{i}" for i in range(17)])), "spec.imagePullSecrets"),
    (with_(("spec.stageDeadlineSeconds", 10)), "spec.stageDeadlineSeconds"),
    # Issue 10: accepted by the CRD and the operator before.
    (with_(("spec.storage.uri", "s3://")), "spec.storage.uri"),
    (with_(("spec.storage.uri", "s3:///runs")), "spec.storage.uri"),
    (with_(("spec.model.sft", "   ")), "spec.model.sft"),
    (with_(("spec.data.seed", "s3://")), "spec.data.seed"),
    (with_(("spec.storage.secretRef", {"name": "../../other/secrets/aws"})), "spec.storage.secretRef.name"),
    (with_(("spec.imagePullSecrets", ["Not A Name"])), "spec.imagePullSecrets[0]"),
    (with_(("spec.storage.endpoint", "minio:9000")), "spec.storage.endpoint"),
    (with_(("spec.storage.endpoint", "http://minio host")), "spec.storage.endpoint"),
    (with_(("spec.storage.region", "us east/1")), "spec.storage.region"),
    (with_(("spec.image", "registry/worker:1 --privileged")), "spec.image"),
    (with_(("spec.resources", {"train": {"image": "a b"}})), "spec.resources.train.image"),
    (with_(("spec.resources", {"train": {"cpu": "-4"}})), "spec.resources.train.cpu"),
    (with_(("spec.resources", {"train": {"memory": "-1Gi"}})), "spec.resources.train.memory"),
    (with_(("spec.resources", {"train": {"nodeSelector": {"gpu": "a100/80gb"}}})),
     "spec.resources.train.nodeSelector.gpu"),
    (with_(("spec.resources", {"train": {"tolerations": [{"key": "gpu", "operator": "Sometimes"}]}})),
     "spec.resources.train.tolerations[0].operator"),
    (with_(("spec.resources", {"train": {"tolerations": [{"key": "gpu", "effect": "Never"}]}})),
     "spec.resources.train.tolerations[0].effect"),
    (with_(("spec.resources", {"train": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}})),
     "spec.resources.train.tolerations[0]"),
    (with_(("spec.generation.seed", 2**32)), "spec.generation.seed"),
    (with_(("spec.training.seed", 2**40)), "spec.training.seed"),
    (with_(("spec.training.lora", {"alpha": 2**63})), "spec.training.lora.alpha"),
    (with_(("spec.iterations", {"count": 1, "promptsPerIteration": 2**64})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.iterations", {"count": 1, "promptsPerIteration": [2**70]})), "spec.iterations.promptsPerIteration"),
    (with_(("spec.gate", {"metric": "heldoutAgreement", "floor": 0.8})), "spec.gate.metric"),  # no data.heldout
    (with_(("spec.gate", {"metric": "lcWinRate", "floor": 40})), "spec.gate.metric"),  # no evaluation.winRate
    (with_(("spec.data.heldout", "s3://d/h.jsonl"), ("spec.gate", {"metric": "heldoutAgreement"})), "spec.gate"),
    (with_(("spec.data.heldout", "s3://d/h.jsonl"), ("spec.gate", {"floor": 85})), "spec.gate"),
    # issue 19.6: a win rate's threshold below 1 is a fraction written where percent is meant
    (with_(("spec.evaluation", {"winRate": {"prompts": "s3://d/p.jsonl",
                                            "judge": {"endpoint": "http://judge:8000/v1", "model": "m"}}}),
           ("spec.gate", {"metric": "winRate", "floor": 0.5})), "spec.gate"),
    (with_(("spec.data.heldout", "s3://d/h.jsonl"), ("spec.gate", {"maxDrop": 0.05, "maxLengthChange": 0.3})),
     "spec.gate.maxLengthChange"),
    (with_(("spec.evaluation", {"winRate": {"prompts": "s3://d/p.jsonl",
                                            "judge": {"endpoint": "judge:8000", "model": "m"}}})),
     "spec.evaluation.winRate.judge.endpoint"),
    # Issue 20: pod overrides never reach what the operator sets (the rendezvous, the stage, credentials), nor
    # Kubernetes', Kueue's, gang schedulers' or the operator's own keys. Issue 18: free-form objects are bounded.
    (with_(("spec.resources", {"train": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"},
                                                 {"name": "MASTER_ADDR", "value": "evil"}]}})),
     "spec.resources.train.env"),
    (with_(("spec.resources", {"seedTrain": {"env": [{"name": "SPA_STAGE_KEY", "value": "x"}]}})),
     "spec.resources.seedTrain.env"),
    (with_(("spec.resources", {"generate": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}})),
     "spec.resources.generate.env"),
    (with_(("spec.resources", {"train": {"env": [{"name": "NCCL=1", "value": "x"}]}})),
     "spec.resources.train.env[0].name"),
    (with_(("spec.resources", {"train": {"labels": {"scheduling.x-k8s.io/pod-group": "other-gang"}}})),
     "spec.resources.train.labels"),
    (with_(("spec.resources", {"train": {"annotations": {"container.apparmor.security.beta.kubernetes.io/worker":
                                                         "unconfined"}}})), "spec.resources.train.annotations"),
    (with_(("spec.resources", {"train": {"extraResources": {"memory": "1Ti"}}})),
     "spec.resources.train.extraResources"),
    (with_(("spec.resources", {"train": {"extraResources": {"rdma/ib": "lots"}}})),
     "spec.resources.train.extraResources.rdma/ib"),
    (with_(("spec.resources", {"train": {"capabilities": ["ipc_lock"]}})), "spec.resources.train.capabilities[0]"),
    (with_(("spec.evaluation", {"winRate": {"prompts": "s3://d/p.jsonl", "judge": {
        "endpoint": "http://judge:8000/v1", "model": "m", "extraBody": {f"k{i}": i for i in range(17)}}}})),
     "spec.evaluation.winRate.judge.extraBody"),
]
IDS = [f"{i:02d}-{field}" for i, (_, field) in enumerate(INVALID)]


def test_crd_file_is_generated_from_the_spec_model():
    assert (ROOT / "crds" / "alignmentrun.yaml").read_text() == crd.render(), \
        "crds/alignmentrun.yaml is stale: run `python -m spa_operator.crd > crds/alignmentrun.yaml`"


def test_crd_metadata():
    c = crdcheck.crd()
    assert c["apiVersion"] == "apiextensions.k8s.io/v1" and c["metadata"]["name"] == "alignmentruns.spa.dev"
    names = c["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("AlignmentRun", "alignmentruns", ["arun"])
    assert c["spec"]["scope"] == "Namespaced"
    version = c["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [col["name"] for col in version["additionalPrinterColumns"]] == ["Phase", "Iteration", "Stage",
                                                                             "Progress", "Done %", "ETA", "Age"]


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], path + "{}")


def test_schema_is_structural_and_documented():
    for path, node in _walk(crdcheck.schema(), ""):
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
        for junctor in ("anyOf", "oneOf", "allOf", "not"):
            assert junctor not in node, f"{path}: {junctor} is not structural here"
        if not path.endswith(("[]", "{}")) and path.count(".") >= 1:
            assert node.get("description"), f"{path}: no description (kubectl explain)"
        if "properties" in node:
            assert "additionalProperties" not in node, path


def test_every_cel_rule_compiles():
    import celpy

    env = celpy.Environment()
    rules = [r["rule"] for _, node in _walk(crdcheck.schema(), "") for r in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 7
    for rule in rules:
        env.compile(rule)


# Number-or-list fields have no type, so no CEL rule can read them on a real API server (test_crd_cel_budget.py):
# the operator alone refuses their bad values (the API server still refuses integers beyond int64 when decoding).
OPERATOR_ONLY = {f"spec.{path}" for path in crd.NUMBER_OR_LIST}


@pytest.mark.parametrize(("doc", "field"), INVALID, ids=IDS)
def test_invalid_run_rejected_by_schema_and_operator_naming_the_field(doc, field):
    errors = crdcheck.errors(doc)
    if field not in OPERATOR_ONLY:
        assert errors, "the CRD schema accepted it"
        assert field in [p for p, _ in errors], errors
    with pytest.raises(SpecError) as exc:
        validate_for_cluster(doc)
    assert exc.value.field == field, str(exc.value)


def test_storage_comes_from_the_run_or_the_operators_default():
    doc = with_(("spec.storage", _DEL))
    assert crdcheck.errors(doc) == []  # the API server accepts it: the operator may have a default
    with pytest.raises(SpecError) as exc:
        validate_for_cluster(doc)
    assert exc.value.field == "spec.storage" and "default storage" in exc.value.message
    default = config.default_storage_from_env({"SPA_DEFAULT_STORAGE_URI": "s3://team-bucket/spa",
                                             "SPA_DEFAULT_STORAGE_ENDPOINT": "http://minio:9000",
                                             "SPA_DEFAULT_STORAGE_SECRET": "s3-creds"})
    st = validate_for_cluster(doc, default).spec.storage
    assert (st.uri, st.endpoint, st.region, st.secret_ref.name) == ("s3://team-bucket/spa", "http://minio:9000",
                                                                   None, "s3-creds")
    assert validate_for_cluster(BASE, default).spec.storage.uri == "s3://bucket/runs"  # the run's own wins
    with pytest.raises(SpecError) as exc:  # a default is held to the same rules
        validate_for_cluster(doc, {"uri": "/mnt/runs"})
    assert exc.value.field == "spec.storage.uri"
    assert config.default_storage_from_env({}) is None


def test_enough_invalid_cases():
    assert len(INVALID) >= 20


def _spec_defaults(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    by_api_server = crdcheck.defaulted(doc)["spec"]
    by_operator = parse_run(doc).model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    return by_api_server, by_operator


@pytest.mark.parametrize("doc", [
    BASE,
    with_(("spec.training", {"beta": 0.2, "lora": {"r": 8}, "refinement": {"window": 10}})),
    with_(("spec.iterations", {"count": 4, "promptsPerIteration": 10}), ("spec.generation", {"shards": 3})),
], ids=["minimal", "partial-training", "broadcast"])
def test_valid_runs_get_the_documented_defaults(doc):
    assert crdcheck.errors(doc) == []
    validate_for_cluster(doc)
    api, op = _spec_defaults(doc)
    assert api == op
    if doc is BASE:
        assert api["iterations"] == {"count": 3}  # promptsPerIteration: the paper's 8000/20000/30000 (operator)
        assert api["generation"]["temperature"] == 0.7 and api["generation"]["responsesPerPrompt"] == 2
        assert api["training"]["beta"] == 0.1 and api["training"]["learningRate"] == 5e-7
        assert api["training"]["refinement"]["lowConfidenceFraction"] == 0.1
        assert api["training"]["refinement"]["smoothing"] == 0.1 and api["maxRetriesPerStage"] == 2


def test_example_manifest_is_valid():
    docs = yaml.safe_load_all((ROOT / "examples" / "alignmentrun.yaml").read_text())
    doc = next(d for d in docs if d and d.get("kind") == "AlignmentRun")
    assert crdcheck.errors(doc) == []
    validate_for_cluster(doc)


def test_spec_is_immutable_once_started_except_suspend():
    started = with_(("status", {"phase": "Running", "stages": [{"name": "iter-00/seed-train"}]}))
    changed = copy.deepcopy(started)
    changed["spec"]["training"] = {"beta": 0.5}
    assert [m for _, m in crdcheck.update_errors(started, changed)] == [crd.IMMUTABLE_MESSAGE]
    suspended = copy.deepcopy(started)
    suspended["spec"]["suspend"] = True
    assert crdcheck.update_errors(started, suspended) == []
    not_started = with_(("status", {"phase": "Failed"}))
    edited = copy.deepcopy(not_started)
    edited["spec"]["training"] = {"beta": 0.5}
    assert crdcheck.update_errors(not_started, edited) == []


@pytest.mark.parametrize(("text", "message"), [
    ("apiVersion: spa.dev/v1alpha1\nkind: AlignmentRun\nmetadata: {name: r}\nspec:\n  model: {sft: /m}\n"
     "  data: {seed: /s, prompts: /p}\n  model: {sft: /other}\n", "duplicate key 'model'"),
    ("apiVersion: spa.dev/v1alpha1\nkind: AlignmentRun\nmetadata: {name: r}\nx0: &a0 [1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]\n" for i in range(1, 9))
     + "spec: {model: {sft: /m}, data: {seed: /s, prompts: /p}}\n", "alias bomb"),
    ("apiVersion: spa.dev/v1alpha1\nkind: AlignmentRun\nmetadata: {name: r}\n"
     "spec: {model: {sft: /m}, data: {seed: /s, prompts: /p}, iterations: {count: '3'}}\n", "spec.iterations.count"),
    ("apiVersion: spa.dev/v1alpha1\nkind: AlignmentRun\nmetadata: {name: r}\n"
     "spec: {model: {sft: '  '}, data: {seed: /s, prompts: /p}}\n", "spec.model.sft"),
])
def test_spa_plan_refuses_what_the_cluster_refuses(tmp_path, capsys, text, message):
    """`spa plan` / `spa run` read a manifest as the API server does: duplicate keys and YAML aliases (alias bombs)
    are refused by the loader, and the spec is parsed as strictly (no "3" for 3); the error names the problem."""
    from spa_operator import cli

    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert cli.main(["plan", str(path), "--storage", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
