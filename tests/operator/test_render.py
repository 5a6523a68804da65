"""`spa render`: the objects the operator would create, as a YAML stream that validates against Kubernetes' schemas;
the paper's 8-GPU, 2-node configuration renders as a gang of training pods that launch 8 processes each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from spa_operator import cli, jobs
from spa_operator.local import local_launch
from spa_operator.planner import stage_graph
from spa_operator.spec import parse_run

ROOT = Path(__file__).resolve().parents[2]
RUN = {
    "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "paper", "namespace": "ml"},
    "spec": {
        "model": {"sft": "s3://models/mistral-7b-sft"},
        "data": {"seed": "s3://d/seed.jsonl", "prompts": "s3://d/prompts.jsonl"},
        "iterations": {"count": 1, "promptsPerIteration": 100},
        "generation": {"backend": "vllm"},
        "training": {"strategy": "fsdp"},
        "storage": {"uri": "s3://runs"},
        "resources": {"seedTrain": {"gpus": 8, "nodes": 2, "scratch": "400Gi"},
                      "train": {"gpus": 8, "nodes": 2, "scratch": "400Gi"}, "generate": {"gpus": 4}},
        "queueName": "gpu",
    },
}


def spa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spa_operator.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_render_two_nodes_of_eight_gpus_validates(tmp_path):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(RUN))
    out = spa("render", str(manifest))
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, desired_version=kubernetes_validate.latest_version(), strict=True)
    kinds = [(d["kind"], d["metadata"]["annotations"][jobs.ANNOTATION_STAGE_KEY]) for d in docs]
    assert kinds == [("Job", "iter-00/validate"), ("Service", "iter-00/seed-train"), ("Job", "iter-00/seed-train"),
                     ("Job", "iter-01/generate"), ("Job", "iter-01/judge"), ("Service", "iter-01/train"),
                     ("Job", "iter-01/train")]
    assert "nvidia.com/gpu" not in str(docs[0]["spec"]["template"]["spec"]["containers"][0].get("resources"))
    train_svc, train = docs[5], docs[6]
    assert (train["spec"]["completionMode"], train["spec"]["completions"], train["spec"]["parallelism"]) == \
        ("Indexed", 2, 2)
    assert train["metadata"]["labels"][jobs.KUEUE_QUEUE_LABEL] == "gpu" and train["spec"]["suspend"] is True
    assert train["spec"]["template"]["spec"]["subdomain"] == train_svc["metadata"]["name"]
    command = " ".join(train["spec"]["template"]["spec"]["containers"][0]["command"])
    assert command.startswith("spa-worker train ") and "--processes 8 --nodes 2 --strategy fsdp" in command
    generate = " ".join(docs[3]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--tensor-parallel-size 4" in generate


def render_here(capsys, path: Path) -> tuple[int, str, str]:
    """`spa render` in this process (the same entry point as the command, without a second interpreter's start)."""
    code = cli.main(["render", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_render_names_a_bad_field(tmp_path, capsys):
    doc = {**RUN, "spec": {**RUN["spec"], "resources": {"judge": {"gpus": 1, "nodes": 2}}}}
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    code, stdout, stderr = render_here(capsys, manifest)
    assert code == 2 and stdout == ""
    assert "spec.resources.judge.nodes: must be 1" in " ".join(stderr.split())  # (the console wraps lines)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_renders_valid_objects(example, capsys):
    code, stdout, stderr = render_here(capsys, ROOT / "examples" / example)
    assert code == 0, stderr
    docs = [d for d in yaml.safe_load_all(stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, desired_version=kubernetes_validate.latest_version(), strict=True)
    train = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"][jobs.LABEL_STAGE] == "train")
    command = " ".join(train["spec"]["template"]["spec"]["containers"][0]["command"])
    if example == "paper-mistral-7b.yaml":  # full-parameter FSDP on 8 GPUs (ZeRO-3 has not run on a GPU), vLLM TP
        assert "--processes 8 --nodes 1 --strategy fsdp" in command and "--lora-r 0" in command
        generate = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"][jobs.LABEL_STAGE] ==
                        "generate")
        assert "--tensor-parallel-size 2" in " ".join(generate["spec"]["template"]["spec"]["containers"][0]["command"])
    if example == "lora-one-gpu.yaml":
        assert "--processes 1 --nodes 1" in command and "--lora-r 16" in command


def test_local_runs_train_on_one_node_with_the_requested_processes():
    stages = stage_graph(parse_run(RUN).spec, "/tmp/r")
    train = next(s for s in stages if s.stage == "train")
    assert (train.args.processes, train.args.nodes) == (8, 2)
    here = local_launch(train, 2)
    assert (here.args.processes, here.args.nodes) == (2, 1)
    assert local_launch(train, None).args.processes == 8  # from the manifest's GPUs
    plain = next(s for s in stage_graph(parse_run({**RUN, "spec": {**RUN["spec"], "resources": {}}}).spec, "/r")
                 if s.stage == "train")
    assert (plain.args.strategy, local_launch(plain, 2).args.strategy) == ("fsdp", "fsdp")  # the spec's choice
    auto = next(s for s in stage_graph(parse_run({**RUN, "spec": {**RUN["spec"], "resources": {},
                                                                  "training": {"lora": {"r": 4}}}}).spec, "/r")
                if s.stage == "train")
    assert (auto.args.strategy, local_launch(auto, 2).args.strategy) == ("auto", "ddp")  # auto, made explicit
    generate = next(s for s in stages if s.stage == "generate")
    assert local_launch(generate, 2) is generate
