"""AlignmentRun parsing: the paper's defaults, and every invalid spec rejected with the field named."""

from __future__ import annotations

import copy

import pytest
import yaml
from spa_operator.spec import SpecError, load_run, parse_run

BASE = {
    "apiVersion": "spa.dev/v1alpha1",
    "kind": "AlignmentRun",
    "metadata": {"name": "r1", "namespace": "team-a"},
    "spec": {"model": {"sft": "s3://models/sft"},
             "data": {"seed": "s3://data/seed.jsonl", "prompts": "s3://data/prompts.jsonl"},
             "storage": {"uri": "s3://bucket/runs"}},
}


def with_(path: str, value) -> dict:
    doc = copy.deepcopy(BASE)
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


_DELETE = object()


def test_defaults_are_the_papers():
    spec = parse_run(BASE).spec
    assert spec.iterations.count == 3
    assert spec.iterations.per_iteration() == [8000, 20000, 30000]
    g, t, r = spec.generation, spec.training, spec.training.refinement
    assert (g.responses_per_prompt, g.temperature, g.top_p, g.max_new_tokens) == (2, 0.7, 1.0, 300)
    assert spec.judge.pairing == "min-max" and spec.judge.reference == "initial"
    assert (t.beta, t.learning_rate, t.seed_epochs, t.epochs_per_iteration, t.batch_size) == (0.1, 5e-7, 3, 1, 32)
    assert (t.max_length, t.max_prompt_length) == (2048, 1024)
    assert (r.enabled, r.low_confidence_fraction, r.smoothing, r.warmup_fraction, r.window) == (True, 0.1, 0.1,
                                                                                                  0.2, 50)
    assert r.per_iteration(3) == [0.5, 0.25, 0.125]


def test_scalars_broadcast_per_iteration():
    doc = with_("spec.iterations", {"count": 4, "promptsPerIteration": 100})
    doc["spec"]["training"] = {"refinement": {"extrapolation": 0}}
    spec = parse_run(doc).spec
    assert spec.iterations.per_iteration() == [100] * 4
    assert spec.training.refinement.per_iteration(4) == [0.0] * 4


INVALID = [
    ("spec.model", _DELETE, "spec.model"),
    ("spec.model.sft", "", "spec.model.sft"),
    ("spec.data.seed", _DELETE, "spec.data.seed"),
    ("spec.data.prompts", 5, "spec.data.prompts"),
    ("spec.iterations.count", -1, "spec.iterations.count"),
    ("spec.iterations.count", "three", "spec.iterations.count"),
    ("spec.iterations", {"count": 2, "promptsPerIteration": [1, 2, 3]}, "spec.iterations.promptsPerIteration"),
    ("spec.iterations", {"count": 5}, "spec.iterations.promptsPerIteration"),
    ("spec.iterations", {"count": 1, "promptsPerIteration": [0]}, "spec.iterations.promptsPerIteration"),
    ("spec.generation.responsesPerPrompt", 1, "spec.generation.responsesPerPrompt"),
    ("spec.generation.temperature", -0.1, "spec.generation.temperature"),
    ("spec.generation.topP", 0, "spec.generation.topP"),
    ("spec.generation.backend", "tgi", "spec.generation.backend"),
    ("spec.generation.shards", 0, "spec.generation.shards"),
    ("spec.judge.pairing", "random", "spec.judge.pairing"),
    ("spec.judge.reference", "sft", "spec.judge.reference"),
    ("spec.training.beta", 0, "spec.training.beta"),
    ("spec.training.learningRate", -1e-6, "spec.training.learningRate"),
    ("spec.training.batchSize", 0, "spec.training.batchSize"),
    ("spec.training.maxPromptLength", 4096, "spec.training"),
    ("spec.training.refinement", {"lowConfidenceFraction": 1.5}, "spec.training.refinement.lowConfidenceFraction"),
    ("spec.training.refinement", {"smoothing": 0.5}, "spec.training.refinement.smoothing"),
    ("spec.training.refinement", {"window": 0}, "spec.training.refinement.window"),
    ("spec.training.refinement", {"extrapolation": [0.5, 0.25]}, "spec.training.refinement.extrapolation"),
    ("spec.training.refinement", {"extrapolation": -1}, "spec.training.refinement.extrapolation"),
    ("spec.training.lora", {"r": 0}, "spec.training.lora.r"),
    ("spec.storage.uri", "gs://bucket/x", "spec.storage.uri"),
    ("spec.maxRetriesPerStage", -1, "spec.maxRetriesPerStage"),
    ("spec.trainng", {}, "spec.trainng"),
    ("metadata.name", "Bad_Name", "metadata.name"),
    ("kind", "Job", "kind"),
]


@pytest.mark.parametrize(("path", "value", "field"), INVALID, ids=[f"{p}={v!r}"[:60] for p, v, _ in INVALID])
def test_invalid_spec_names_the_field(path, value, field):
    with pytest.raises(SpecError) as exc:
        parse_run(with_(path, value))
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value).startswith(field + ":")


def test_load_run_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml: \(file\): not found"):
        load_run(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: \(document\): not valid YAML"):
        load_run(bad)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump_all([BASE, BASE]))
    with pytest.raises(SpecError, match="found 2"):
        load_run(two)
    good = tmp_path / "good.yaml"
    good.write_text("# other docs are ignored\n---\nkind: ConfigMap\n---\n" + yaml.safe_dump(BASE))
    assert load_run(good).metadata.name == "r1"
