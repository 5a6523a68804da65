"""Stage fingerprints: what goes in (arguments, input identities) and what stays out (how a stage runs)."""

from __future__ import annotations

import os
from dataclasses import replace

from spa_workers import contract, fingerprint
from spa_workers.contract import GenerateArgs, StageManifest, TrainArgs


def _train(**kw) -> TrainArgs:
    return TrainArgs(**{"model": "/m", "pairs": "/p.jsonl", "output": "/out", **kw})


def test_execution_fields_and_the_output_path_stay_out():
    base = fingerprint.fingerprint(_train(), {"model": "a", "pairs": "b"})[0]
    for change in ({"processes": 4}, {"nodes": 2}, {"strategy": "fsdp"}, {"checkpoint_every_steps": 10},
                   {"output": "/elsewhere"}, {"model": "/moved/m"}):
        assert fingerprint.fingerprint(_train(**change), {"model": "a", "pairs": "b"})[0] == base, change
    assert fingerprint.fingerprint(_train(learning_rate=1e-6), {"model": "a", "pairs": "b"})[0] != base
    assert fingerprint.fingerprint(_train(), {"model": "a", "pairs": "c"})[0] != base  # another input
    gen = GenerateArgs(policy="/m", prompts="/p", output="/o", shard_count=2, shard_index=0)
    assert fingerprint.fingerprint(replace(gen, tensor_parallel_size=8), {})[0] == fingerprint.fingerprint(gen, {})[0]


def test_describe_change_names_fields_and_inputs():
    _, old = fingerprint.fingerprint(_train(), {"model": "a", "pairs": "b"})
    _, new = fingerprint.fingerprint(_train(beta=0.2, seed=1), {"model": "a", "pairs": "c"})
    assert fingerprint.describe_change(old, new) == "beta 0.1 -> 0.2; seed 0 -> 1; changed input pairs"
    assert fingerprint.describe_change({}, new) == "written before stage fingerprints, so its settings are unknown"
    renamed = {**old, "args": {**old["args"], "save_steps": 50}}
    assert fingerprint.describe_change(renamed, old) == "save_steps 50 (no longer an argument)"


def test_input_identity_follows_content_and_upstream_manifests(tmp_path):
    data = tmp_path / "seed.jsonl"
    data.write_text('{"a": 1}\n')
    first = fingerprint.input_identity(str(data))
    os.utime(data, (0, 0))  # a touch alone does not change a small file's identity
    assert fingerprint.input_identity(str(data)) == first
    data.write_text('{"a": 2}\n')
    assert fingerprint.input_identity(str(data)) != first
    assert fingerprint.input_identity(str(tmp_path / "absent")) == "missing"
    # A stage's model/ subfolder is identified by the stage's manifest; a sharded stage by its shards'.
    stage = tmp_path / "iter-01" / "train"
    (stage / "model").mkdir(parents=True)
    (stage / contract.MANIFEST).write_text(StageManifest("train", {}, fingerprint="f1").to_json())
    assert fingerprint.input_identity(str(stage / "model")) == "f1"
    gen = tmp_path / "iter-01" / "generate"
    for i, fp in enumerate(("s0", "s1")):
        shard = contract.shard_dir(str(gen), i, 2)
        os.makedirs(shard)
        with open(os.path.join(shard, contract.MANIFEST), "w") as fh:
            fh.write(StageManifest("generate", {}, fingerprint=fp).to_json())
    assert fingerprint.input_identity(str(gen)) == fingerprint.combine_shards(["s0", "s1"])


def test_shards_of_another_shard_count_make_the_stage_stale(tmp_path):
    """A generate stage rerun with more shards must not mix with the old shards its judge would also read."""
    from spa_operator.local import StageCheck, check_stages
    from spa_operator.planner import stage_graph
    from spa_operator.spec import parse_run

    doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r"},
           "spec": {"model": {"sft": "/m"}, "data": {"seed": "/s.jsonl", "prompts": "/p.jsonl"},
                    "iterations": {"count": 1, "promptsPerIteration": 8}, "generation": {"shards": 2}}}
    graph = stage_graph(parse_run(doc).spec, str(tmp_path))
    old = contract.shard_dir(str(tmp_path / "iter-01" / "generate"), 0, 1)
    os.makedirs(old)
    _, of = fingerprint.fingerprint(replace(graph[2].args, shard_count=1, shard_index=0), {})
    with open(os.path.join(old, contract.MANIFEST), "w") as fh:
        fh.write(StageManifest("generate", {}, fingerprint="old", fingerprint_of=of).to_json())
    status = check_stages(graph)["iter-01/generate"]
    assert status.check is StageCheck.STALE and "spec.generation.shards 1 -> 2" in status.change
