"""Two real operator processes (`python -m spa_operator.kube`, configured by environment as the Helm chart does: a
Lease, a pod name) against one emulated cluster: only the Lease holder acts; when it is killed, the other takes over
after the Lease runs out and finishes the run, with no Job created twice."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster import Harness, pod_base_env
from runs import tiny_run, wait_for
from test_faults import FAKE, S3_KEYS, finish

pytestmark = pytest.mark.asyncio

DURATION_S, RENEW_S = 3.0, 0.5


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{server}"}}}}]
users: [{{name: operator, user: {{}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator, user: operator, namespace: ns}}}}]
current-context: emulator
""")
    return path


def start_replica(tmp_path: Path, config: Path, pod: str) -> tuple[subprocess.Popen, Path]:
    """One operator process, started as the chart's Deployment starts it (SPA_LEASE and POD_NAME from the
    environment); the Lease timings are shortened to keep the test short."""
    env = {**os.environ, "KUBECONFIG": str(config), "SPA_LEASE": "ns/spa-operator", "POD_NAME": pod,
           "SPA_LEASE_DURATION_S": str(DURATION_S), "SPA_LEASE_RENEW_S": str(RENEW_S),
           "SPA_OPERATOR_TIMER_S": "5", "SPA_OPERATOR_PROGRESS_S": "0.5", "SPA_OPERATOR_RETRY_S": "0.5"}
    log = tmp_path / f"{pod}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spa_operator.kube", "--namespace", "ns", "--metrics-port", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def holder(cluster: Any) -> str | None:
    obj = cluster._object("coordination.k8s.io/v1/leases", "ns", "spa-operator")
    return None if obj is None or obj.deleted else obj.raw.get("spec", {}).get("holderIdentity")


def lease_time(cluster: Any, field: str) -> datetime.datetime:
    raw = cluster._object("coordination.k8s.io/v1/leases", "ns", "spa-operator").raw["spec"][field]
    return datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))


def requests_by(cluster: Any, pod: str) -> list[tuple[str, str]]:
    """(method, resource) of every request the operator `pod` made through its own API client."""
    return [(m, plural) for m, agent, plural, _ in cluster.emulator.log if agent == f"spa-operator/{pod}"]


async def test_only_the_lease_holder_acts_and_the_other_takes_over_when_it_dies(cluster, s3_env, tmp_path):
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url)
    # kopf's namespace scanning (on, as in a cluster) serves only namespaces that exist.
    await cluster.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": "ns"}})
    procs: list[subprocess.Popen] = []
    try:
        async with Harness(cluster, pod_base_env(S3_KEYS), stub=True, stub_seconds=3.0) as harness:
            a, _ = start_replica(tmp_path, config, "op-a")
            procs.append(a)
            await wait_for(lambda: holder(cluster) == "op-a", 30, "op-a to hold the Lease")
            b, b_log = start_replica(tmp_path, config, "op-b")
            procs.append(b)
            await wait_for(lambda: b"waiting for Lease" in b_log.read_bytes(), 30, "op-b to wait for the Lease")
            await cluster.create_run(tiny_run("ha", FAKE, s3_env["BUCKET"], s3_env["SPA_S3_ENDPOINT"], iterations=0))
            first = "ha-i00-validate-a1"
            await wait_for(lambda: first in harness.created, 30, "op-a to create the first Job")
            # Only the holder acted: the candidate made no request but for the Lease.
            assert {r for _, r in requests_by(cluster, "op-b")} == {"leases"}
            assert ("POST", "jobs") in requests_by(cluster, "op-a")

            a.kill()  # SIGKILL: no cleanup, the Lease stays op-a's until it runs out
            killed = time.monotonic()
            await asyncio.to_thread(a.wait, 10)
            last_renew = lease_time(cluster, "renewTime")  # op-a's last renewal: dead processes renew nothing
            await wait_for(lambda: holder(cluster) == "op-b", 30, "op-b to take the Lease over")
            took = time.monotonic() - killed
            # Not before the Lease ran out (a full duration after op-a's last renewal, whenever that was: under
            # load it may be well before the kill), and soon after the kill (the candidate looks every RENEW_S;
            # slack for a loaded machine).
            assert (lease_time(cluster, "acquireTime") - last_renew).total_seconds() >= DURATION_S - 0.01
            assert took <= DURATION_S + 2 * RENEW_S + 3.0, took
            assert await finish(cluster, "ha", timeout=45) == "Succeeded"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    # Every Job was created once: op-a's first Job was adopted by op-b, not created again.
    assert cluster.all_jobs_ever() == ["ha-i00-evaluate-a1", "ha-i00-seed-train-a1", first]
    posts = {pod: [r for r in requests_by(cluster, pod) if r == ("POST", "jobs")] for pod in ("op-a", "op-b")}
    assert (len(posts["op-a"]), len(posts["op-b"])) == (1, 2), posts
    assert b_log.read_bytes().count(b"holding Lease") == 1
