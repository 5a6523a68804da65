"""Live metrics: the worker's optional endpoint (through the stage runner), the dashboard's metric names against live
/metrics of the operator and the worker, and a real Prometheus server (Debian's `prometheus`, installed by
scripts/install-tools.sh) scraping the operator and the worker pods during an integration run on the kmock cluster.

The integration run uses tests/operator/stub_worker.py (same argv and stage contract as `spa-worker`, through the same
runner, without model work): the point here is the metrics path — operator and worker endpoints -> Prometheus -> the
dashboard's queries — not the workers' model code, which tests/operator/test_full_run.py covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))

from chartlib import concrete, dashboard_queries, exposed_names, free_port, http_get, metric_names, tool
from cluster import Harness, pod_base_env, start_cluster
from operator_runner import OperatorRunner
from runs import phase, tiny_run, wait_for
from spa_operator import kube
from spa_workers import live_metrics
from spa_workers.contract import GenerateArgs
from spa_workers.runner import run_stage

HERE = Path(__file__).resolve().parent


FAKE = {"model": "/models/sft", "seed": "/data/seed.jsonl", "prompts": "/data/prompts.jsonl",
        "heldout": "/data/heldout.jsonl"}
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture()
def worker_port(monkeypatch):
    port = free_port()
    monkeypatch.setenv(live_metrics.PORT_ENV, str(port))
    live_metrics.reset()
    yield port
    live_metrics.reset()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def worker_metrics_text(tmp_path: Path) -> str:
    """Run a stage through the runner with the endpoint on; scrape it from inside the stage (while it runs)."""
    seen: dict[str, str] = {}

    def body(work) -> None:
        work.progress(3, 10, unit="steps", loss=0.52, samples_per_s=4.0)
        work.progress(4, 10, unit="steps", loss=0.5, samples_per_s=4.5, tokens_per_s=120.0)
        seen["text"] = http_get(f"http://127.0.0.1:{live_metrics.live().server.server_port}/metrics")
        (Path(work.dir) / "out.txt").write_text("x")

    args = GenerateArgs(policy="p", prompts="x.jsonl", output=str(tmp_path / "gen"), shard_index=0)
    assert run_stage(args, body) == 0
    return seen["text"]


def test_worker_serves_live_metrics_while_a_stage_runs(tmp_path, worker_port):
    text = worker_metrics_text(tmp_path)
    assert _sample(text, "spa_worker_progress") == pytest.approx(0.4)
    assert _sample(text, "spa_worker_items_done") == 4 and _sample(text, "spa_worker_items_total") == 10
    assert 'unit="steps"' in text and 'stage="generate"' in text
    assert _sample(text, "spa_worker_loss") == pytest.approx(0.5)
    assert _sample(text, "spa_worker_samples_per_second") == pytest.approx(4.5)
    assert _sample(text, "spa_worker_tokens_per_second") == pytest.approx(120.0)
    assert _sample(text, "spa_worker_items_per_second") > 0
    assert abs(_sample(text, "spa_worker_last_progress_timestamp_seconds") - time.time()) < 60


def test_worker_endpoint_is_off_without_the_port(tmp_path, monkeypatch):
    monkeypatch.delenv(live_metrics.PORT_ENV, raising=False)
    live_metrics.reset()
    args = GenerateArgs(policy="p", prompts="x.jsonl", output=str(tmp_path / "gen"), shard_index=0)
    assert run_stage(args, lambda work: work.progress(1, 2)) == 0
    assert live_metrics.live() is None


async def _operator_metrics_text() -> str:
    """The operator's own /metrics endpoint (serve_http), live; the controller never reaches an API server."""
    ctl = kube.make_controller(kube.Config(server="http://127.0.0.1:9", metrics_port=None))
    port = free_port()
    runner = await kube.serve_http(ctl, "127.0.0.1", port)
    try:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    finally:
        await runner.cleanup()
        await ctl.api.close()


@pytest.mark.asyncio
async def test_dashboard_names_only_metrics_the_code_exports(tmp_path, worker_port):
    exported = exposed_names(await _operator_metrics_text()) | exposed_names(worker_metrics_text(tmp_path))
    assert "spa_run_phase" in exported and "spa_stage_duration_seconds_bucket" in exported
    assert "spa_worker_tokens_per_second" in exported
    used = {title: metric_names(concrete(e)) for title, exprs in dashboard_queries().items() for e in exprs}
    assert all(used.values()), used
    unknown = {t: sorted(names - exported) for t, names in used.items() if names - exported}
    assert not unknown, f"dashboard queries name metrics nobody exports: {unknown}"


# ------------------------------------------------------------------------------------------ Prometheus, live run


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                                     for job, target in targets.items()]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = tmp / "prometheus.log"

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.logfile.read_text()[-2000:]
        try:
            http_get(f"{self.url}/-/ready", timeout=1)
            return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = json.loads(http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def eventually(prom: Prometheus, expr: str, timeout: float, what: str,
                     check=lambda result: True) -> list[dict[str, Any]]:
    """Query until the result is non-empty and passes `check` (scrapes lag the cluster by a second or so)."""
    t0, result = time.monotonic(), []
    while time.monotonic() - t0 < timeout:
        result = await asyncio.to_thread(prom.query, expr)
        if result and check(result):
            return result
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {expr} -> {result}")


def values(result: list[dict[str, Any]], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


@pytest.mark.asyncio
async def test_prometheus_scrapes_operator_and_workers_during_a_run(tmp_path, s3_env):
    """A run on the emulated cluster, the operator serving /metrics and its worker pods serving live metrics, a real
    Prometheus scraping both every second: the dashboard's key queries (phase, stage per run, iteration, a quality
    figure, worker progress) return data through Prometheus' HTTP API — during the run and after it."""
    op_port, worker_port = free_port(), free_port()
    prom = Prometheus(tmp_path, {"spa-operator-metrics": f"127.0.0.1:{op_port}",
                                 "spa-workers": f"127.0.0.1:{worker_port}"})
    queries = {t: [concrete(e) for e in exprs] for t, exprs in dashboard_queries().items()}
    try:
        await wait_for(lambda: prom.ready(), 60, "Prometheus to be ready", interval=0.2)
        async with start_cluster() as cluster:
            op = OperatorRunner(cluster.url, ["ns"], metrics_port=op_port, metrics_host="127.0.0.1",
                                          worker_metrics_port=worker_port)
            async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=2.5, max_pods=1):
                await op.start()
                try:
                    await cluster.create_run(tiny_run("watched", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"],
                                                      iterations=1))
                    # While the run runs: Prometheus sees it Running, in a stage, and a worker pod's progress.
                    running = await eventually(prom, 'spa_run_phase{phase="Running"} == 1', 60, "phase Running")
                    assert running[0]["metric"]["run"] == "watched"
                    stage = await eventually(prom, queries["Stage per run"][0], 60, "the running stage")
                    assert stage[0]["metric"]["stage"] and float(stage[0]["value"][1]) >= 0
                    await eventually(prom, queries["Worker progress"][0], 60, "a worker's live progress")
                    await wait_for(lambda: phase(cluster, "watched") in ("Succeeded", "Failed"), 120, "the run",
                                   interval=0.2)
                    assert phase(cluster, "watched") == "Succeeded", cluster.run("watched")["status"]
                    # After it: the dashboard's key panels have data.
                    await eventually(prom, queries["Runs by phase"][0] + " > 0", 30, "phase Succeeded",
                                     lambda r: values(r, "phase") == {"Succeeded": 1.0})
                    await eventually(prom, queries["Iteration"][0], 30, "iteration 1",
                                     lambda r: values(r, "run") == {"watched": 1.0})
                    await eventually(prom, queries["Reward gap (chosen - rejected)"][0], 30, "the reward gap",
                                     lambda r: values(r, "iteration") == {"1": 0.25})  # the stub judge's figure
                    await eventually(prom, queries["Held-out gold agreement"][0], 30, "agreement",
                                     lambda r: set(values(r, "iteration")) == {"0", "1"})
                    # the cost panels: the stub stages' ledger (8 prompts x 2 answers x 4 tokens), summed
                    await eventually(prom, queries["Tokens per run"][0], 30, "tokens generated",
                                     lambda r: values(r, "run") == {"watched": 64.0})
                    await eventually(prom, queries["Time left and percent done"][1], 30, "percent done",
                                     lambda r: values(r, "run") == {"watched": 100.0})
                    await eventually(prom, queries["Stage duration (mean)"][0], 30, "stage durations",
                                     lambda r: {"seed-train", "generate", "judge", "train", "evaluate"}
                                     <= set(values(r, "stage")))
                    assert values(await eventually(prom, 'up{job="spa-operator-metrics"}', 10, "up"), "job") == \
                        {"spa-operator-metrics": 1.0}
                finally:
                    await op.stop()
    finally:
        with contextlib.suppress(Exception):
            prom.stop()
