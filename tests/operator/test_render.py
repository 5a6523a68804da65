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
    assert kinds == [("Job", "iter-00/validate"), ("Job", "iter-00/seed-train"), ("Service", "iter-00/seed-train"),
                     ("Job", "iter-01/generate"), ("Job", "iter-01/judge"), ("Job", "iter-01/train"),
                     ("Service", "iter-01/train")]
    assert "nvidia.com/gpu" not in str(docs[0]["spec"]["template"]["spec"]["containers"][0].get("resources"))
    train, train_svc = docs[5], docs[6]
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


def test_render_shows_the_pod_overrides_the_chart_defaults_and_the_gang_scheduler(tmp_path, capsys):
    """Issue 20: the fabric a platform sets once (worker.podDefaults), a run's own overrides and the gang scheduler's
    pod group, all in `spa render`'s output, which validates against Kubernetes' schemas."""
    train = {**RUN["spec"]["resources"]["train"], "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
             "scratchClaimSize": "400Gi", "scratchStorageClass": "local-nvme"}
    doc = {**RUN, "spec": {**RUN["spec"], "queueName": None, "resources": {**RUN["spec"]["resources"],
                                                                          "train": train}}}
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    manifest, defaults = tmp_path / "run.yaml", tmp_path / "pod-defaults.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    defaults.write_text(yaml.safe_dump({"gpu": {"extraResources": {"vpc.amazonaws.com/efa": "32",
                                                                   "hugepages-2Mi": "5120Mi"},
                                                "env": [{"name": "FI_PROVIDER", "value": "efa"}]}}))
    code = cli.main(["render", str(manifest), "--pod-defaults", str(defaults), "--gang-scheduler", "volcano"])
    out = capsys.readouterr()
    assert code == 0, out.err
    docs = [d for d in yaml.safe_load_all(out.out) if d]
    for d in docs:
        if d["kind"] != "PodGroup":  # a CRD's kind: kubernetes-validate knows only the built-in ones
            kubernetes_validate.validate(d, desired_version=kubernetes_validate.latest_version(), strict=True)
    train_objects = [d for d in docs if d["metadata"]["annotations"][jobs.ANNOTATION_STAGE_KEY] == "iter-01/train"]
    assert [d["kind"] for d in train_objects] == ["Job", "Service", "PodGroup"]
    job, _, group = train_objects
    pod = job["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["NCCL_DEBUG"] == "INFO"  # the chart's, and the run's over the default
    assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] == "32"
    assert "ephemeral-storage" not in c["resources"]["requests"]  # scratch is a claim, not node-local disk
    (scratch,) = [v for v in pod["spec"]["volumes"] if v["name"] == "scratch"]
    assert scratch["ephemeral"]["volumeClaimTemplate"]["spec"] == {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "400Gi"}},
        "storageClassName": "local-nvme"}
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == job["metadata"]["name"]
    assert (group["apiVersion"], group["spec"]) == ("scheduling.volcano.sh/v1beta1", {"minMember": 2})
    assert group["metadata"]["ownerReferences"][0]["kind"] == "Job"
    validate = next(d for d in docs if d["metadata"]["annotations"][jobs.ANNOTATION_STAGE_KEY] == "iter-00/validate")
    assert "vpc.amazonaws.com/efa" not in str(validate) and "FI_PROVIDER" not in str(validate)  # CPU: no fabric


@pytest.mark.parametrize(("spec", "message"), [
    ({"resources": {"train": {"env": [{"name": "WORLD_SIZE", "value": "1"}]}}},
     "spec.resources.train.env: WORLD_SIZE is set by the operator"),
    ({"resources": {"judge": {"labels": {"spa.dev/run": "other"}}}}, "spec.resources.judge.labels: spa.dev/run is"),
])
def test_spa_plan_refuses_reserved_overrides_in_one_line(tmp_path, capsys, spec, message):
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump({**RUN, "spec": {**RUN["spec"], **spec}}))
    assert cli.main(["plan", str(manifest), "--storage", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
