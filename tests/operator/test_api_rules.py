"""The emulator refuses and behaves as a real kube-apiserver does where the operator's tests rely on it. Each case
names the Kubernetes behaviour it copies (see api_rules.py for the sources)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import api_rules
import pytest
from cluster import start_cluster

pytestmark = pytest.mark.asyncio
JOBS = "/apis/batch/v1/namespaces/ns/jobs"
RUNS = "/apis/spa.dev/v1alpha1/namespaces/ns/alignmentruns"


def job(name: str, **labels: str) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}


async def raw(cluster, method: str, path: str, body: bytes, content_type: str = "application/json",
              agent: str = "test-client") -> tuple[int, str, dict[str, str]]:
    async with cluster.session.request(method, cluster.url + path, data=body,
                                       headers={"Content-Type": content_type, "User-Agent": agent}) as r:
        return r.status, await r.text(), dict(r.headers)


async def test_non_finite_numbers_and_invalid_json_are_refused_with_400():
    """Go's encoding/json has no NaN/Infinity tokens: a create or a merge patch holding one is a 400 BadRequest, and
    nothing is stored (Python's json.dumps writes them unless allow_nan=False)."""
    async with start_cluster() as cluster:
        status, _ = await cluster.request("POST", JOBS, job("j"))
        assert status in (200, 201)
        for token in ("NaN", "Infinity", "-Infinity"):
            body = b'{"status": {"succeeded": %s}}' % token.encode()
            status, text, _ = await raw(cluster, "PATCH", f"{JOBS}/j/status", body, "application/merge-patch+json")
            answer = json.loads(text)
            assert (status, answer["reason"], answer["kind"]) == (400, "BadRequest", "Status"), text
            assert answer["message"].startswith("error decoding patch: invalid character"), answer
        status, text, _ = await raw(cluster, "POST", JOBS, json.dumps(job("k")).replace('"i"', "NaN").encode())
        assert status == 400 and "json parse error" in json.loads(text)["message"]
        status, text, _ = await raw(cluster, "POST", JOBS, b'{"kind": "Job", ')
        assert status == 400
        assert set(cluster.jobs()) == {"j"} and "succeeded" not in (cluster.jobs()["j"].get("status") or {})


async def test_oversized_bodies_and_objects_are_refused():
    """Over --max-request-bytes (3 MiB): 413 before decoding. Over etcd's 1.5 MiB request limit: etcd refuses the
    write and the API server answers 500 "etcdserver: request is too large"."""
    async with start_cluster() as cluster:
        big = job("big")
        big["metadata"]["annotations"] = {"a": "x" * (api_rules.MAX_REQUEST_BYTES + 1)}
        status, text, _ = await raw(cluster, "POST", JOBS, json.dumps(big).encode())
        assert status == 413 and json.loads(text)["reason"] == "RequestEntityTooLarge"
        big["metadata"]["annotations"] = {"a": "x" * (api_rules.ETCD_MAX_BYTES + 1)}
        status, body = await cluster.request("POST", JOBS, big)
        assert (status, body["message"]) == (500, "etcdserver: request is too large")
        status, _ = await cluster.request("POST", JOBS, job("small"))
        assert status in (200, 201)
        status, body = await cluster.request("PATCH", f"{JOBS}/small", {"metadata": {"annotations": {
            "a": "x" * (api_rules.ETCD_MAX_BYTES + 1)}}}, "application/merge-patch+json")
        assert status == 500 and "too large" in body["message"]
        assert set(cluster.jobs()) == {"small"} and "annotations" not in cluster.jobs()["small"]["metadata"]


async def test_a_stale_resource_version_precondition_is_a_409_conflict():
    """metadata.resourceVersion in a patch is a precondition: a stale one is refused with the registry's Conflict."""
    async with start_cluster() as cluster:
        _, created = await cluster.request("POST", JOBS, job("j"))
        old = created["metadata"]["resourceVersion"]
        status, patched = await cluster.request("PATCH", f"{JOBS}/j/status", {
            "metadata": {"resourceVersion": old}, "status": {"active": 1}}, "application/merge-patch+json")
        assert status == 200 and patched["metadata"]["resourceVersion"] != old
        status, body = await cluster.request("PATCH", f"{JOBS}/j/status", {
            "metadata": {"resourceVersion": old}, "status": {"active": 2}}, "application/merge-patch+json")
        assert (status, body["reason"]) == (409, "Conflict")
        assert body["message"] == ('Operation cannot be fulfilled on jobs.batch "j": the object has been modified; '
                                   "please apply your changes to the latest version and try again")
        assert cluster.jobs()["j"]["status"]["active"] == 1


async def test_denials_carry_their_own_messages():
    """RBAC, an admission webhook, a ValidatingAdmissionPolicy and a ResourceQuota all answer 403, each with the
    message of what refused (the client can tell them apart only by it)."""
    denials = {
        "rbac": api_rules.rbac_denial("system:serviceaccount:spa:op", "create", "batch", "jobs", "ns"),
        "webhook": api_rules.webhook_denial("validate.kyverno.svc", "privileged pods are not allowed", "batch",
                                            "jobs", "w"),
        "policy": api_rules.policy_denial("no-gpu", "no-gpu-binding", "failed expression: gpus == 0", "batch",
                                          "jobs", "p"),
        "quota": api_rules.quota_denial("batch", "jobs", "quota", "team-quota", "count/jobs.batch", 5, 5),
    }
    async with start_cluster() as cluster:
        cluster.emulator.faults.deny = lambda request: denials.get(request.data["metadata"]["name"]) \
            if request.method.value.upper() == "POST" and isinstance(request.data, dict) else None
        answers = {}
        for name in (*denials, "ok"):
            status, body = await cluster.request("POST", JOBS, job(name))
            answers[name] = (status, body)
        assert {n: s for n, (s, _) in answers.items()} == {"rbac": 403, "webhook": 403, "policy": 403,
                                                            "quota": 403, "ok": 200}
        assert answers["rbac"][1]["message"] == (
            'jobs.batch is forbidden: User "system:serviceaccount:spa:op" cannot create resource "jobs" in '
            'API group "batch" in the namespace "ns"')
        assert answers["webhook"][1]["message"] == ('admission webhook "validate.kyverno.svc" denied the request: '
                                                    "privileged pods are not allowed")
        assert answers["policy"][1]["message"].startswith("ValidatingAdmissionPolicy 'no-gpu' with binding")
        assert answers["quota"][1]["message"] == ('jobs.batch "quota" is forbidden: exceeded quota: team-quota, '
                                                  "requested: count/jobs.batch=1, used: count/jobs.batch=5, "
                                                  "limited: count/jobs.batch=5")
        assert set(cluster.jobs()) == {"ok"}


async def test_apf_throttling_answers_429_with_retry_after_in_plain_text():
    async with start_cluster() as cluster:
        cluster.emulator.faults.throttle = lambda request: 2
        status, text, headers = await raw(cluster, "POST", JOBS, json.dumps(job("j")).encode())
        assert (status, headers["Retry-After"], text) == (429, "2", "Too many requests, please try again later.\n")
        assert cluster.jobs() == {}


async def test_hung_and_slow_requests():
    async with start_cluster() as cluster:
        cluster.emulator.faults.hang = lambda request: request.method.value.upper() == "POST"
        posting = asyncio.ensure_future(cluster.request("POST", JOBS, job("j")))
        await asyncio.sleep(0.5)
        assert not posting.done() and cluster.emulator.faults.hung == 1
        cluster.emulator.faults.release()
        assert (await posting)[0] == 200
        cluster.emulator.faults.delay = lambda request: 0.4
        t0 = time.monotonic()
        assert (await cluster.request("GET", f"{JOBS}/j"))[0] == 200
        assert time.monotonic() - t0 >= 0.4


async def watch_lines(cluster, query: str, seconds: float) -> tuple[list[dict], bool]:
    """The events of a watch read for `seconds`, and whether the server ended the stream by then."""
    lines: list[dict] = []

    async def read() -> None:
        async with cluster.session.get(f"{cluster.url}{JOBS}?watch=true&{query}",
                                       timeout=aiohttp.ClientTimeout(total=None)) as r:
            async for line in r.content:
                if line.strip():
                    lines.append(json.loads(line))

    task = asyncio.ensure_future(read())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    task.cancel()
    return lines, bool(done)


async def test_watches_end_at_their_timeout_send_bookmarks_and_can_stall():
    """The server closes a watch after timeoutSeconds; with allowWatchBookmarks it sends BOOKMARKs (kube-apiserver:
    every minute and right before the deadline; faster here). A stalled watch stays open and silent."""
    async with start_cluster() as cluster:
        cluster.emulator.faults.bookmark_s = 0.3
        _, listed = await cluster.request("GET", JOBS)
        assert int(listed["metadata"]["resourceVersion"]) == cluster.emulator.revision  # not kmock's "..."
        lines, ended = await watch_lines(cluster, "timeoutSeconds=1&allowWatchBookmarks=true", 5)
        assert ended and 2 <= sum(e["type"] == "BOOKMARK" for e in lines) <= 5, lines
        lines, ended = await watch_lines(cluster, "timeoutSeconds=1", 5)
        assert ended and not any(e["type"] == "BOOKMARK" for e in lines)

        cluster.emulator.faults.stall_watch = lambda request: True
        watching = asyncio.ensure_future(watch_lines(cluster, "timeoutSeconds=1&allowWatchBookmarks=true", 2.5))
        await asyncio.sleep(0.3)
        await cluster.request("POST", JOBS, job("j"))
        lines, ended = await watching
        assert lines == [] and not ended
