"""Operator pieces behind the chart's monitoring: the running-stage gauge (stage per run, stuck-stage alert) and the
worker defaults the chart passes through the environment (service account, live-metrics port)."""

from __future__ import annotations

import kubernetes_validate
from prometheus_client import generate_latest
from spa_operator import jobs, kube
from spa_operator.status import metric_values


def _series(metrics: kube.Metrics, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for m in metrics.registry.collect() for s in m.samples
            if s.name == name}


def test_running_stage_gauge_follows_status():
    m = kube.Metrics()
    export = lambda st: m.export("ns", "r", metric_values(st))  # noqa: E731
    status = {"phase": "Running", "iteration": 1, "stage": "judge", "progress": 0.5, "stages": [
        {"name": "iter-01/generate", "iteration": 1, "stage": "generate", "state": "Succeeded",
         "startTime": "2026-01-01T00:00:00Z"},
        {"name": "iter-01/judge", "iteration": 1, "stage": "judge", "state": "Running",
         "startTime": "2026-01-01T01:00:00Z"}]}
    export(status)
    series = _series(m, "spa_run_stage_started_timestamp_seconds")
    key = (("iteration", "1"), ("namespace", "ns"), ("run", "r"), ("stage", "judge"))
    assert series == {key: 1767229200.0}
    export({**status, "phase": "Succeeded", "stages": []})
    assert _series(m, "spa_run_stage_started_timestamp_seconds") == {}
    export(status)
    m.forget("ns", "r")
    assert _series(m, "spa_run_stage_started_timestamp_seconds") == {}
    assert b"spa_run_stage_started_timestamp_seconds" in generate_latest(m.registry)


def test_answer_lengths_per_iteration_are_exported():
    """Length drift (issue 19.7): the iteration's model's answer length on the win-rate prompts, the SFT model's on
    the same prompts, and what the generate stage sampled, from the stages' compact metrics in the status."""
    m = kube.Metrics()
    status = {"phase": "Running", "stages": [
        {"name": "iter-02/generate", "iteration": 2, "stage": "generate", "state": "Succeeded",
         "metrics": {"answer_tokens_mean": 119.0}},
        {"name": "iter-02/evaluate", "iteration": 2, "stage": "evaluate", "state": "Succeeded",
         "metrics": {"eval_answer_tokens_mean": 81.0, "sft_answer_tokens_mean": 119.0, "heldout_agreement": 0.5,
                     "heldout_agreement_se": 0.05}}]}
    m.export("ns", "r", metric_values(status))
    key = (("iteration", "2"), ("namespace", "ns"), ("run", "r"))
    assert _series(m, "spa_iteration_answer_tokens") == {key: 81.0}
    assert _series(m, "spa_iteration_sft_answer_tokens") == {key: 119.0}
    assert _series(m, "spa_iteration_sampled_answer_tokens") == {key: 119.0}
    assert _series(m, "spa_iteration_heldout_agreement_stderr") == {key: 0.05}


def test_worker_defaults_from_environment(monkeypatch):
    monkeypatch.setenv("SPA_WORKER_SERVICE_ACCOUNT", "spa-worker")
    monkeypatch.setenv("SPA_WORKER_METRICS_PORT", "9400")
    cfg = kube.Config.from_env()
    assert cfg.worker_service_account == "spa-worker" and cfg.worker_metrics_port == 9400
    monkeypatch.delenv("SPA_WORKER_SERVICE_ACCOUNT")
    monkeypatch.delenv("SPA_WORKER_METRICS_PORT")
    cfg = kube.Config.from_env()
    assert cfg.worker_service_account is None and cfg.worker_metrics_port is None


def test_job_gets_default_service_account_and_metrics_port():
    from spa_operator.planner import stage_graph
    from spa_operator.spec import parse_run

    doc = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r", "namespace": "ns"},
           "spec": {"model": {"sft": "s3://m/sft"}, "data": {"seed": "s3://d/s.jsonl", "prompts": "s3://d/p.jsonl"},
                    "storage": {"uri": "s3://runs/spa"}}}
    spec = parse_run(doc).spec
    run = jobs.RunRef(name="r", namespace="ns", uid="0c6f2a9e-1111-2222-3333-444455556666")
    stage = stage_graph(spec, "s3://runs/spa/ns/r/0c6f2a9e")[0]
    plain = jobs.build_job(stage, 1, run, spec)
    assert "serviceAccountName" not in plain["spec"]["template"]["spec"]
    assert "ports" not in plain["spec"]["template"]["spec"]["containers"][0]
    job = jobs.build_job(stage, 1, run, spec, default_service_account="spa-worker", metrics_port=9400)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "spa-worker"
    (c,) = pod["containers"]
    assert {"name": "SPA_WORKER_METRICS_PORT", "value": "9400"} in c["env"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    kubernetes_validate.validate(job, desired_version=kubernetes_validate.latest_version(), strict=True)
    # A run's own serviceAccountName wins over the default.
    spec2 = parse_run({**doc, "spec": {**doc["spec"], "serviceAccountName": "mine"}}).spec
    assert jobs.build_job(stage, 1, run, spec2, default_service_account="spa-worker")[
        "spec"]["template"]["spec"]["serviceAccountName"] == "mine"
