"""The cost ledger's pure parts: sums (ledger.py), the status fields (run_cost.py), the report section
(cost_report.py) and the per-run Prometheus counters (cost_metrics.py); and the worker side's generic entries (the
storage layer's byte counters, requested GPUs x wall time) through the stage runner."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from prometheus_client import generate_latest
from spa_operator import cost_report, kube, ledger, reconcile, run_cost
from spa_operator.ledger import Cost
from spa_operator.planner import stage_graph
from spa_operator.spec import parse_run
from spa_operator.status import metric_values
from spa_workers import contract, storage
from spa_workers.contract import GenerateArgs, Ledger, StageManifest, TrainArgs
from spa_workers.runner import run_stage

L = Ledger


def test_sum_adds_parts_keeps_estimates_marked_and_drops_what_the_contract_refuses():
    total = ledger.sum_ledgers([
        Cost({L.TOKENS_GENERATED: 10, L.CPU_SECONDS: 1.5}),
        Cost({L.TOKENS_GENERATED: 5, L.TOKENS_TRAINED: 7.0}, frozenset({L.TOKENS_TRAINED})),
        Cost({"gpu_hours": 3, L.PAIRS_TRAINED: math.nan, L.BYTES_READ: -1, L.PROMPTS: math.inf}),
    ])
    assert total.amounts == {L.TOKENS_GENERATED: 15, L.TOKENS_TRAINED: 7, L.CPU_SECONDS: 1.5}
    assert list(total.amounts) == [k for k in L.KEYS if k in total.amounts]  # the contract's order
    assert isinstance(total.amounts[L.TOKENS_TRAINED], int)  # whole amounts stay counts in JSON
    assert total.estimated == {L.TOKENS_TRAINED}
    assert ledger.sum_ledgers([]) == Cost({}, frozenset())


def test_per_iteration_and_cumulative():
    parts = [(0, Cost({L.GOLD_LABELS: 100})), (1, Cost({L.TOKENS_GENERATED: 10})),
             (1, Cost({L.TOKENS_GENERATED: 5}, frozenset({L.TOKENS_GENERATED}))), (2, Cost({L.TOKENS_GENERATED: 1}))]
    by = ledger.per_iteration(parts)
    assert {i: dict(c.amounts) for i, c in by.items()} == {0: {L.GOLD_LABELS: 100}, 1: {L.TOKENS_GENERATED: 15},
                                                           2: {L.TOKENS_GENERATED: 1}}
    cum = ledger.cumulative(by)
    assert dict(cum[2].amounts) == {L.GOLD_LABELS: 100, L.TOKENS_GENERATED: 16}
    assert cum[2].estimated == {L.TOKENS_GENERATED} and cum[0].estimated == frozenset()


def _manifest(ledger_: dict, estimated: list[str] = (), work_s: float | None = None) -> StageManifest:
    timings = {"wall_s": 2.0, **({contract.WORK_SECONDS: work_s} if work_s is not None else {})}
    return StageManifest(stage="generate", files={}, ledger=ledger_, ledger_estimated=list(estimated),
                         timings=timings)


def test_stage_record_and_status_cost_are_bounded_and_finite():
    shards = [_manifest({L.TOKENS_GENERATED: 10, L.CPU_SECONDS: 1.25}, work_s=1.0),
              _manifest({L.TOKENS_GENERATED: 12, L.CPU_SECONDS: 1.0}, [L.CPU_SECONDS], work_s=1.5)]
    rec = ledger.record_fields(shards)
    assert rec == {"ledger": {L.TOKENS_GENERATED: 22, L.CPU_SECONDS: 2.25}, "ledgerEstimated": [L.CPU_SECONDS],
                   "workSeconds": 1.5}  # the slowest shard's work time
    records = [{"name": "a", **rec}, {"name": "b", "ledger": {L.TOKENS_GENERATED: 1, "junk": 5}},
               {"name": "c", "ledger": "not a ledger", "ledgerEstimated": [3]}]
    cost = ledger.status_cost(records)
    assert cost == {"total": {L.TOKENS_GENERATED: 23, L.CPU_SECONDS: 2.25}, "estimated": [L.CPU_SECONDS]}
    contract.dumps(cost)  # finite only
    everything = {k: 1e300 for k in L.KEYS}
    big = ledger.status_cost([{"ledger": everything}] * 500)
    assert len(big["total"]) == len(L.KEYS) and len(json.dumps(big)) < 1024
    assert ledger.status_cost([{"name": "x"}]) is None


RUN = {"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "r", "namespace": "ns"},
       "spec": {"model": {"sft": "s3://m/sft"}, "data": {"seed": "s3://d/s.jsonl", "prompts": "s3://d/p.jsonl"},
                "iterations": {"count": 1, "promptsPerIteration": 10}, "storage": {"uri": "s3://runs/spa"}}}


def _records(state_of_train: str) -> list[dict]:
    t = lambda s: f"2026-01-01T00:{s // 60:02d}:{s % 60:02d}Z"  # noqa: E731
    done = lambda name, kind, start, end, wall, work=None, led=None: {  # noqa: E731
        "name": name, "stage": kind, "state": "Succeeded", "startTime": t(start), "endTime": t(end),
        "metrics": {"wall_s": wall}, **({"workSeconds": work} if work else {}), "ledger": led or {}}
    return [done("iter-00/validate", "validate", 0, 3, 2.0, led={L.GOLD_LABELS: 64}),
            done("iter-00/seed-train", "seed-train", 3, 9, 5.0, 4.0, {L.PAIRS_TRAINED: 8}),
            done("iter-01/generate", "generate", 9, 22, 12.0, 10.0, {L.TOKENS_GENERATED: 1000, L.PROMPTS: 10}),
            done("iter-01/judge", "judge", 22, 32, 9.0, 8.0, {L.TOKENS_SCORED: 4000, L.PAIRS_JUDGED: 10}),
            {"name": "iter-01/train", "stage": "train", "state": state_of_train, "startTime": t(32)}]


def test_status_fields_from_records():
    graph = stage_graph(parse_run(RUN).spec, "s3://runs/spa/ns/r/u")
    running = run_cost.status_fields(graph, _records("Running"), ("iter-01/train", 0.5))
    assert running["cost"]["total"] == {L.GOLD_LABELS: 64, L.TOKENS_GENERATED: 1000, L.PROMPTS: 10,
                                        L.PAIRS_JUDGED: 10, L.TOKENS_SCORED: 4000, L.PAIRS_TRAINED: 8}
    # train has not finished once: its kind is unmeasured, so the ETA is unknown and the percent is by stages
    assert running["estimatedRemaining"] == "unknown" and "estimatedRemainingSeconds" not in running
    assert running["progressPercentage"] == int(100 * 4 / 5)
    succeeded = run_cost.status_fields(graph, _records("Succeeded"), succeeded=True)
    assert (succeeded["progressPercentage"], succeeded["estimatedRemainingSeconds"]) == (100, 0)
    failed = run_cost.status_fields(graph, _records("Failed"), failed=True)
    assert set(failed) == {"cost"}
    contract.dumps(running)


def test_decide_puts_cost_and_eta_into_the_status():
    """Through the decision core: a stage that succeeds brings its manifest's ledger into its record and the run's
    status.cost; the ETA fields and the printer column's text are there."""
    spec = parse_run(RUN).spec
    graph = stage_graph(spec, "s3://runs/spa/ns/r/u")
    validate = graph[0]
    job = reconcile.JobView(name="r-i00-validate-a1", stage_key=validate.key, attempt=1, state="succeeded",
                            owner_uid="u")
    status = {"phase": "Running", "startTime": "2026-01-01T00:00:00Z", "stages": [
        {"name": validate.key, "iteration": 0, "stage": "validate", "state": "Running", "job": job.name,
         "attempts": 1, "failures": 0, "startTime": "2026-01-01T00:00:00Z"}]}
    manifest = StageManifest(stage="validate", files={}, ledger={L.GOLD_LABELS: 64, L.CPU_SECONDS: 1.5},
                             timings={"wall_s": 2.0})
    obs = reconcile.Observed(namespace="ns", name="r", uid="u", generation=1, status=status, now=1767225605.0,
                             graph=graph, spec=spec, root="s3://runs/spa/ns/r/u", jobs=(job,),
                             manifests={validate.key: [manifest]})
    new = reconcile.decide(obs).status
    assert new["stages"][0]["ledger"] == {L.GOLD_LABELS: 64, L.CPU_SECONDS: 1.5}
    assert new["cost"] == {"total": {L.GOLD_LABELS: 64, L.CPU_SECONDS: 1.5}}
    assert new["estimatedRemaining"] == "unknown" and 0 <= new["progressPercentage"] < 100
    values = metric_values(new)
    assert values.cost == {L.GOLD_LABELS: 64.0, L.CPU_SECONDS: 1.5} and values.remaining_s is None


def test_cost_counters_follow_the_status_and_go_with_the_run():
    m = kube.Metrics()
    export = lambda total, remaining=None: m.export("ns", "r", metric_values(  # noqa: E731
        {"phase": "Running", "cost": {"total": total}, "progressPercentage": 40,
         **({"estimatedRemainingSeconds": remaining} if remaining is not None else {})}))
    text = lambda: generate_latest(m.registry).decode()  # noqa: E731
    export({L.TOKENS_GENERATED: 100, L.ACCELERATOR_SECONDS: 7.5}, 120)
    export({L.TOKENS_GENERATED: 250, L.ACCELERATOR_SECONDS: 7.5}, 60)
    assert 'spa_run_tokens_generated_total{namespace="ns",run="r"} 250.0' in text()
    assert 'spa_run_accelerator_seconds_total{namespace="ns",run="r"} 7.5' in text()
    assert 'spa_run_estimated_remaining_seconds{namespace="ns",run="r"} 60.0' in text()
    export({L.TOKENS_GENERATED: 250})  # unknown again: no gauge rather than a stale number
    assert "spa_run_estimated_remaining_seconds{" not in text()
    # a restarted operator counts the run from zero up to its status's totals
    again = kube.Metrics()
    again.export("ns", "r", metric_values({"phase": "Running", "cost": {"total": {L.TOKENS_GENERATED: 250}}}))
    assert 'spa_run_tokens_generated_total{namespace="ns",run="r"} 250.0' in generate_latest(again.registry).decode()
    m.forget("ns", "r")
    assert 'run="r"' not in text().split("spa_run_phase")[-1] and "spa_run_tokens_generated_total{" not in text()


def test_report_section_per_iteration_totals_and_per_point():
    its = {0: Cost({L.GOLD_LABELS: 100, L.CPU_SECONDS: 3600}),
           1: Cost({L.TOKENS_GENERATED: 1000, L.CPU_SECONDS: 7200, L.TOKENS_TRAINED: 50},
                   frozenset({L.TOKENS_TRAINED})),
           2: Cost({L.TOKENS_GENERATED: 3000, L.CPU_SECONDS: 3600})}

    class Row:
        def __init__(self, i, agreement):
            self.iteration, self.heldout_agreement, self.win_rate = i, agreement, None

    points = cost_report.per_point(its, [Row(0, 0.60), Row(1, 0.62), Row(2, 0.59)])
    assert points[0]["gain_points"] == pytest.approx(2.0)
    assert points[0]["cpu_hours_per_point"] == pytest.approx(2 / 2.0)  # iteration 1's 2 CPU-hours, 2 points
    assert points[0]["tokens_per_point"] == pytest.approx(500)
    assert points[1]["gain_points"] == pytest.approx(-1.0) and "cpu_hours_per_point" not in points[1]
    report = cost_report.CostReport(its, ledger.sum_ledgers(its.values()), points)
    head, rows = report.table()
    assert head[:2] == ["iteration", "gold labels"] and rows[-1][0] == "total"
    assert rows[1][head.index("tokens trained")] == "~50"  # an estimate, marked
    assert rows[-1][head.index("CPU-hours")] == "4"
    md = report.markdown()
    assert "## Cost" in md and "| total | 100 |" in md and "Per point gained" in md
    assert json.loads(json.dumps(report.to_json()))["total"][L.CPU_SECONDS] == 14400


# ------------------------------------------------------------------------------------ worker side (the runner)


def test_storage_layer_counts_object_bytes(tmp_path):
    read0, written0 = storage.traffic()
    storage.write_bytes(str(tmp_path / "a"), b"x" * 100)
    assert storage.read_bytes(str(tmp_path / "a")) == b"x" * 100
    storage.upload_file(str(tmp_path / "a"), str(tmp_path / "b"))
    storage.download_file(str(tmp_path / "b"), str(tmp_path / "c"))
    assert storage.exists(str(tmp_path / "c")) and storage.list_files(str(tmp_path))  # metadata: not counted
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_bytes(b"y" * 1000)
    storage.count_local_tree_read(str(tmp_path / "model"))
    storage.count_local_tree_read(str(tmp_path / "model"))  # once per process
    read, written = storage.traffic()
    assert (read - read0, written - written0) == (100 + 100 + 1000, 100 + 100)


def test_s3_traffic_is_counted(s3_env, tmp_path):
    read0, written0 = storage.traffic()
    uri = f"s3://{s3_env['BUCKET']}/x/obj"
    storage.write_text(uri, "hello")
    (tmp_path / "f").write_bytes(b"z" * 300)
    storage.upload_file(str(tmp_path / "f"), uri + "2")
    assert storage.read_text(uri) == "hello"
    storage.download_file(uri + "2", str(tmp_path / "g"))
    read, written = storage.traffic()
    assert (read - read0, written - written0) == (5 + 300, 5 + 300)


def test_every_stage_counts_cpu_storage_and_requested_gpus_x_wall(tmp_path, monkeypatch):
    """The runner's entries: measured CPU time, bytes through storage (outputs moved into a local output folder
    count as written), and requested GPUs x wall time from the process start, times the nodes of a train stage."""
    monkeypatch.setenv(contract.REQUESTED_GPUS_ENV, "2")
    monkeypatch.setenv(contract.REQUESTED_CPUS_ENV, "0.5")
    started = time.time() - 10.0
    monkeypatch.setenv("SPA_STAGE_STARTED", str(started))
    data = tmp_path / "in.txt"
    data.write_text("q" * 1234)

    def body(work):
        storage.read_bytes(str(data))
        (tmp_path / "unused").write_text("not storage")
        with open(os.path.join(work.dir, "out.bin"), "wb") as fh:
            fh.write(b"o" * 5000)
        sum(i * i for i in range(200_000))  # some CPU

    args = TrainArgs(model="m", pairs="p.jsonl", output=str(tmp_path / "train"), nodes=3)
    assert run_stage(args, body) == 0
    m = contract.read_manifest(args.output)
    wall = m.ledger[L.ACCELERATOR_SECONDS] / (2 * 3)
    assert 10.0 <= wall <= 10.0 + (time.time() - started - 10.0) + 1
    assert m.ledger[L.CPU_SECONDS_REQUESTED] == pytest.approx(0.5 * 3 * wall, rel=1e-3)
    assert m.ledger[L.BYTES_READ] == 1234
    assert 5000 <= m.ledger[L.BYTES_WRITTEN] < 5000 + 2000  # the output, and its heartbeats if any
    assert m.ledger[L.CPU_SECONDS] > 0
    monkeypatch.delenv(contract.REQUESTED_CPUS_ENV)
    gen = GenerateArgs(policy="p", prompts="x.jsonl", output=str(tmp_path / "gen"), shard_index=0)
    assert run_stage(gen, lambda work: None) == 0
    g = contract.read_manifest(contract.shard_dir(gen.output, 0, 1))
    assert L.CPU_SECONDS_REQUESTED not in g.ledger and g.ledger[L.ACCELERATOR_SECONDS] >= 2 * 10.0


def test_a_retried_stage_gives_no_duration_sample():
    """A stage whose first attempt failed: its record's startTime is the first attempt's, so its duration says
    nothing about a stage's: done, it adds no executor-gap sample."""
    graph = stage_graph(parse_run(RUN).spec, "s3://runs/spa/ns/r/u")
    recs = {r["name"]: r for r in _records("Running")}
    recs["iter-01/generate"]["failures"] = 1
    recs["iter-01/train"]["failures"] = 1
    clocks = {c.key: c for c in run_cost.clocks_from_records(graph, recs, ("iter-01/train", 0.5))}
    assert clocks["iter-01/generate"].seconds is None and clocks["iter-01/judge"].seconds == 10.0
    assert clocks["iter-01/train"].fraction == 0.5


def test_spa_run_passes_each_stage_the_gpus_it_holds_here(monkeypatch):
    """`spa run`'s requests, which a stage's accelerator-seconds count: a train stage one GPU per process, a vLLM
    engine one per tensor-parallel rank, validate none, never more than this machine's visible GPUs."""
    from dataclasses import replace

    from spa_operator import local

    graph = {s.key: s for s in stage_graph(parse_run(RUN).spec, "/tmp/r")}
    train = local.local_launch(graph["iter-01/train"], 4)
    generate = graph["iter-01/generate"]
    generate = replace(generate, args=replace(generate.args, tensor_parallel_size=2))

    def gpus(stage, here: int) -> str:
        return local.requested_env(stage, here)[contract.REQUESTED_GPUS_ENV]

    assert [gpus(train, 8), gpus(train, 2), gpus(generate, 8), gpus(generate, 0)] == ["4", "2", "2", "0"]
    assert gpus(graph["iter-00/validate"], 8) == "0"
    for visible, count in (("0,1", 2), ("-1", 0), ("", 0)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local.local_gpus() == count
