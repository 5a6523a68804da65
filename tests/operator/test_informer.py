"""The operator's own Job and pod watch (`informer.Informer`) against an HTTP server that answers list and watch as
the API server does where kmock does not: a watch resumes from a resourceVersion, a stream ends (timeoutSeconds),
a version too old is answered with 410 Gone, objects are deleted while no watch is open. The index must end equal to
what the server holds, and each deletion must be reported once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import kubernetes
import pytest
from aiohttp import web
from runs import wait_for
from spa_operator.informer import Informer
from spa_operator.kubeapi import KubeApi

LABEL = "spa.dev/run-uid"


def job(name: str, uid: str, rv: int, state: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {LABEL: uid}, "resourceVersion": str(rv)},
            "status": {"state": state}}


class FakeApiServer:
    """List and watch of one collection. `script` holds, per watch request in order, what the server sends: a list
    of events, or an int (an HTTP status to answer with)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.script: list[Any] = []
        self.requests: list[dict[str, str]] = []
        self.app = web.Application()
        self.app.router.add_get("/apis/batch/v1/namespaces/ns/jobs", self.serve)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.more = asyncio.Event()  # set when the script was extended while a watch waits for it

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self, informer: asyncio.Future[Any], api: KubeApi) -> None:
        informer.cancel()
        await asyncio.gather(informer, return_exceptions=True)
        await api.close()
        self.script.append([])  # a watch still waiting for the script ends
        self.more.set()
        assert self.runner is not None
        await self.runner.cleanup()

    def put(self, obj: dict[str, Any]) -> None:
        self.version = int(obj["metadata"]["resourceVersion"])
        self.objects[obj["metadata"]["name"]] = obj

    async def serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.query))
        if request.query.get("watch") != "true":
            return web.json_response({"metadata": {"resourceVersion": str(self.version)},
                                      "items": list(self.objects.values())})
        while not self.script:
            self.more.clear()
            await self.more.wait()
        step = self.script.pop(0)
        if isinstance(step, int):
            return web.json_response({"kind": "Status", "code": step}, status=step)
        response = web.StreamResponse()
        await response.prepare(request)
        for event in step:
            data = json.dumps(event).encode() + b"\n"
            await response.write(data[:7])  # a line split across chunks
            await response.write(data[7:])
        await response.write_eof()  # the stream ends (the server's timeoutSeconds)
        return response


@pytest.mark.asyncio
async def test_watch_resumes_relists_on_410_and_reports_deletions_missed_meanwhile():
    server = FakeApiServer()
    await server.start()
    server.put(job("a", "run-1", 1))
    server.put(job("b", "run-1", 2))
    server.put(job("c", "run-2", 3))
    changes: list[tuple[str, str, str | None]] = []
    api = KubeApi(kubernetes.client.Configuration(host=server.url))
    informer = Informer(api, "batch/v1", "Job", LABEL, lambda o: o["status"]["state"],
                        lambda uid, ns, name, view: changes.append((uid, name, view)), ["ns"], retry_s=0.05)
    # First watch: a changes, d appears, c goes, a bookmark; the stream then ends. Second: the version is too old
    # (410 as an ERROR event). Meanwhile b was deleted and e created: the relist must report b gone.
    server.script = [
        [{"type": "MODIFIED", "object": job("a", "run-1", 4, "done")},
         {"type": "ADDED", "object": job("d", "run-2", 5)},
         {"type": "DELETED", "object": job("c", "run-2", 6)},
         {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}],
    ]
    task = asyncio.ensure_future(informer.run())
    try:
        await asyncio.wait_for(informer.synced(), 10)
        await wait_for(lambda: len(server.requests) >= 3, 10, "the second watch")  # it waits for the script
        server.objects.pop("b")
        server.objects.pop("c")
        server.put(job("a", "run-1", 4, "done"))
        server.put(job("d", "run-2", 5))
        server.put(job("e", "run-1", 12))
        server.script += [[{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}], []]
        server.more.set()
        await wait_for(lambda: len(server.requests) >= 5, 10, "the relist and its watch")
        await wait_for(lambda: ("run-1", "b", None) in changes, 10, "b reported deleted")
    finally:
        await server.stop(task, api)

    assert {v for v in informer.get("run-1")} == {"done", ""} and informer.get("run-2") == ("",)
    assert informer.get("gone") == () and len(informer) == 3  # a, e of run-1; d of run-2
    assert [c for c in changes if c[2] is None] == [("run-2", "c", None), ("run-1", "b", None)]  # each deletion once
    lists = [q for q in server.requests if q.get("watch") != "true"]
    watches = [q for q in server.requests if q.get("watch") == "true"]
    assert len(lists) == 2 and all(q["labelSelector"] == LABEL for q in server.requests)
    # The first list may come from the API server's watch cache (resourceVersion 0, as client-go lists); the one
    # after a 410 asks for the most recent state (no resourceVersion), the cache being older than what was seen.
    assert [q.get("resourceVersion") for q in lists] == ["0", None]
    # Each watch resumes from the last version seen: the list's, then the bookmark's, then the relist's.
    assert [q.get("resourceVersion") for q in watches[:3]] == ["3", "9", "12"]
    assert all(q["allowWatchBookmarks"] == "true" and int(q["timeoutSeconds"]) > 0 for q in watches)


@pytest.mark.asyncio
async def test_a_refused_watch_is_retried_and_an_expired_version_answered_with_http_410_relists():
    server = FakeApiServer()
    await server.start()
    server.put(job("a", "run-1", 1))
    api = KubeApi(kubernetes.client.Configuration(host=server.url))
    informer = Informer(api, "batch/v1", "Job", LABEL, lambda o: o["status"]["state"], lambda *_: None, ["ns"],
                        retry_s=0.05)
    server.script = [503, 410, []]
    task = asyncio.ensure_future(informer.run())
    try:
        await wait_for(lambda: len(server.requests) >= 5, 10, "list, two refused watches, list, watch")
    finally:
        await server.stop(task, api)
    kinds = ["watch" if q.get("watch") == "true" else "list" for q in server.requests]
    assert kinds[:5] == ["list", "watch", "watch", "list", "watch"]  # 503: same version again; 410: list again
    assert server.requests[2].get("resourceVersion") == "1"


@pytest.mark.asyncio
async def test_objects_are_keyed_by_namespace_and_name(cluster):
    """A run's Jobs are keyed by (namespace, name): a Job of the same name carrying the run's uid label in another
    namespace (a label copied by hand, a restored backup) is not the run's, and its deletion does not evict the run's
    own Job from the index (keyed by name, it did)."""
    api = KubeApi(kubernetes.client.Configuration(host=cluster.url))
    changes: list[tuple[str, str, str, Any]] = []
    informer = Informer(api, "batch/v1", "Job", LABEL, lambda o: o["metadata"]["namespace"],
                        lambda uid, ns, name, view: changes.append((uid, ns, name, view)), ["ns", "other"],
                        retry_s=0.05)
    for ns in ("ns", "other"):
        body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "r-i00-validate-a1", "namespace": ns,
                                                                      "labels": {LABEL: "run-1"}}, "spec": {}}
        assert (await cluster.request("POST", f"/apis/batch/v1/namespaces/{ns}/jobs", body))[0] in (200, 201)
    task = asyncio.ensure_future(informer.run())
    try:
        await asyncio.wait_for(informer.synced(), 10)
        assert informer.get("run-1", "ns") == ("ns",) and sorted(informer.get("run-1")) == ["ns", "other"]
        assert (await cluster.request("DELETE", "/apis/batch/v1/namespaces/other/jobs/r-i00-validate-a1"))[0] == 200
        await wait_for(lambda: ("run-1", "other", "r-i00-validate-a1", None) in changes, 10, "the deletion")
        assert informer.get("run-1", "ns") == ("ns",) and informer.get("run-1", "other") == ()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()
