"""fields.py against the planner: every argument a stage's fingerprint covers is named by the manifest field it
comes from, and changing that field changes the argument (so a "made with other settings" message names what the
user changed, e.g. spec.training.learningRate, not learning_rate)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from spa_operator.fields import spec_field, user_inputs
from spa_operator.planner import stage_graph
from spa_operator.spec import parse_run
from spa_workers import fingerprint

ROOT = "/store/ns/r"
JUDGE = {"endpoint": "http://judge/v1", "model": "j", "extraBody": {"a": 1}}
FULL = {
    "model": {"sft": "/m"},
    "data": {"seed": "/s.jsonl", "prompts": "/p.jsonl", "heldout": "/h.jsonl"},
    "iterations": {"count": 2, "promptsPerIteration": [8, 8]},
    "training": {"lora": {"r": 8}},
    "evaluation": {"winRate": {"prompts": "/w.jsonl", "referenceModel": "/ref", "judge": JUDGE}},
}
WITH_ANSWERS = {**FULL, "evaluation": {"winRate": {"prompts": "/w.jsonl", "referenceAnswers": "/a.jsonl",
                                                   "judge": JUDGE}}}
# A different valid value for every field the table names.
OTHER: dict[str, Any] = {
    "spec.model.sft": "/m2", "spec.data.seed": "/s2.jsonl", "spec.data.prompts": "/p2.jsonl",
    "spec.data.heldout": "/h2.jsonl", "spec.iterations.promptsPerIteration": [4, 4],
    "spec.training.beta": 0.2, "spec.training.learningRate": 1e-4, "spec.training.batchSize": 16,
    "spec.training.microBatchSize": 4, "spec.training.maxLength": 4096, "spec.training.maxPromptLength": 256,
    "spec.training.seedEpochs": 2, "spec.training.epochsPerIteration": 2, "spec.training.seed": 3,
    "spec.training.lora.r": 4, "spec.training.lora.alpha": 8, "spec.training.lora.dropout": 0.1,
    "spec.training.refinement.enabled": False, "spec.training.refinement.lowConfidenceFraction": 0.2,
    "spec.training.refinement.smoothing": 0.2, "spec.training.refinement.warmupFraction": 0.5,
    "spec.training.refinement.window": 10, "spec.training.refinement.extrapolation": [0.3, 0.1],
    "spec.generation.responsesPerPrompt": 3, "spec.generation.temperature": 1.0, "spec.generation.topP": 0.9,
    "spec.generation.maxNewTokens": 64, "spec.generation.seed": 3, "spec.generation.backend": "transformers",
    "spec.generation.batchSize": 4, "spec.generation.shards": 2,
    "spec.judge.pairing": "max-random", "spec.judge.backend": "vllm", "spec.judge.shards": 2,
    "spec.evaluation.winRate.prompts": "/w2.jsonl", "spec.evaluation.winRate.samples": 5,
    "spec.evaluation.winRate.referenceAnswers": "/a2.jsonl", "spec.evaluation.winRate.referenceModel": "/ref2",
    "spec.evaluation.winRate.backend": "transformers", "spec.evaluation.winRate.maxNewTokens": 64,
    "spec.evaluation.winRate.temperature": 0.1, "spec.evaluation.winRate.judge.endpoint": "http://other/v1",
    "spec.evaluation.winRate.judge.model": "k", "spec.evaluation.winRate.judge.extraBody": {"b": 2},
    "spec.evaluation.winRate.judge.maxFailedFraction": 0.1,
}


def run_of(spec: dict):
    return parse_run({"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
                      "spec": copy.deepcopy(spec)})


def with_field(spec: dict, field: str, value: Any) -> dict:
    out = copy.deepcopy(spec)
    *path, last = field.split(".")[1:]
    node = out
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def named_args(spec: dict):
    """(stage, arg, value, field) for every argument a stage's fingerprint covers, inputs from another stage aside."""
    run = run_of(spec)
    graph = stage_graph(run.spec, ROOT)
    outputs = {u for s in graph for u in (s.output, s.output + "/model")}
    for s in graph:
        covered = {**fingerprint.fingerprinted_args(s.args), **fingerprint.input_uris(s.args)}
        for arg, value in covered.items():
            if value in outputs:
                continue
            yield s, arg, value, spec_field(s.stage, arg)


# constants, and a shard's own index (the executor's)
UNNAMED = {("judge", "max_batch_tokens"), ("evaluate", "max_batch_tokens"), ("evaluate", "backend"),
           ("generate", "shard_index"), ("judge", "shard_index")}
UNNAMED |= {("seed-train", a) for a in ("refinement", "low_confidence_fraction", "smoothing", "warmup_fraction",
                                        "window", "extrapolation")}


@pytest.mark.parametrize("spec", [FULL, WITH_ANSWERS], ids=["reference-model", "reference-answers"])
def test_every_argument_is_named_by_its_field_and_the_field_changes_it(spec):
    checked: dict[tuple[str, str], bool] = {}
    for stage, arg, value, field in named_args(spec):
        if (stage.stage, arg) in UNNAMED:
            assert field is None, f"{stage.stage} {arg} is set by the planner, not by {field}"
            continue
        assert field is not None, f"fields.py names no manifest field for {stage.stage}'s argument {arg}"
        if arg in fingerprint.INPUT_FIELDS:  # a user's input: the field that holds this very URI
            assert user_inputs(run_of(spec))[field][0] == value, (stage.key, arg, field)
        changed = stage_graph(run_of(with_field(spec, field, OTHER[field])).spec, ROOT)
        now = next(s for s in changed if s.key == stage.key)
        moved = getattr(now.args, arg) != value
        checked[(stage.stage, arg)] = checked.get((stage.stage, arg), False) or moved
    # e.g. iteration 1's slice starts at 0 whatever the counts: one stage of each kind must show the change
    assert [k for k, moved in checked.items() if not moved] == []
    assert len(checked) > 40


def test_a_stale_stage_names_the_manifest_fields(tmp_path):
    from spa_operator.local import check_stages
    from spa_workers import contract
    from spa_workers.contract import StageManifest

    (tmp_path / "s.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    spec = with_field(FULL, "spec.data.seed", str(tmp_path / "s.jsonl"))
    old = stage_graph(run_of(spec).spec, str(tmp_path))[1]  # seed-train
    fp, of = fingerprint.of_stage(old.args)
    (tmp_path / "iter-00" / "seed-train").mkdir(parents=True)
    (tmp_path / "iter-00" / "seed-train" / contract.MANIFEST).write_text(
        StageManifest("seed-train", {}, fingerprint=fp, fingerprint_of=of).to_json())
    (tmp_path / "s.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')
    changed = with_field(spec, "spec.training.learningRate", 1e-4)
    status = check_stages(stage_graph(run_of(changed).spec, str(tmp_path)))["iter-00/seed-train"]
    assert status.change == "spec.training.learningRate 5e-07 -> 0.0001; changed input spec.data.seed"
