"""A stand-in cluster for the operator tests: kmock's Kubernetes emulator over HTTP, made a little more like an API
server (uids, resourceVersions, generations, CRD defaulting and validation, labelSelector on list and watch), plus a
harness that plays the Job controller and the kubelet: it runs each Job's container command as a local process with
the Job's env and writes the Job's status, applying the Job's podFailurePolicy as Kubernetes would.

A multi-node stage's Job (an Indexed Job whose pods name a subdomain) is a gang: the harness starts all its pods at
once, whatever `max_pods` says (they must meet), resolves their `<job>-<index>.<subdomain>` names to 127.0.0.1 as
cluster DNS would resolve them to pod IPs, gives the gang a free rendezvous port (pods have their own IPs in a
cluster, here they share loopback), and when the Job fails it kills the gang's other pods, as the Job controller does.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime as dt
import itertools
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import crdcheck
import jsonpointer
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums
from kmock._internal import parsing as kmock_parsing

RUNS = "spa.dev/v1alpha1/alignmentruns"
JOBS = "batch/v1/jobs"
WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"
PODGROUPS = "scheduling.x-k8s.io/v1alpha1/podgroups"
HERE = Path(__file__).resolve().parent
STUB_WORKER = HERE / "stub_worker.py"
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
log = logging.getLogger("harness")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock plus what the operator relies on from a real API server."""

    validate_runs: bool = True
    # OwnerReferencesPermissionEnforcement (OpenShift): an ownerReference with blockOwnerDeletion needs `update` on
    # the owner's finalizers subresource; the operator "has" it when this is True.
    enforce_owner_refs: bool = False
    finalizers_granted: bool = False
    deletions: dict[str, str] = attrs.field(factory=dict)  # Job name -> propagationPolicy of its DELETE ("" if none)
    _rv: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _inflight: set[int] = attrs.field(factory=set, init=False)
    # (method, user agent, resource plural, subresource) of every request, for counting writes.
    log: list[tuple[str, str, str, str | None]] = attrs.field(factory=list, init=False)
    # (user agent, resource plural, "list" or "watch", labelSelector or "") of every collection read.
    reads: list[tuple[str, str, str, str]] = attrs.field(factory=list, init=False)
    # (user agent, resource plural, namespace, name) of every object a list or watch sent to a client.
    served: set[tuple[str, str, str, str]] = attrs.field(factory=set, init=False)
    # (user agent, API group, resource plural, subresource, RBAC verb) of every request: what RBAC would be asked.
    verbs: set[tuple[str, str, str, str | None, str]] = attrs.field(factory=set, init=False)
    # (user agent, resource plural) -> watch events sent (the operator's kopf pays for each one; benchmarks count them)
    watch_events: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter, init=False)

    async def _handle(self, request: Any) -> Any:
        plural = request.resource.plural if request.resource is not None else ""
        agent = request.headers.get("User-Agent", "") or ""
        self.log.append((request.method.value.upper(), agent, plural or "", request.subresource))
        if request.resource is not None:
            verb = {"GET": "watch" if request.action == kmock_enums.action.WATCH else "list"
                    if request.action == kmock_enums.action.LIST else "get", "POST": "create", "PATCH": "patch",
                    "PUT": "update", "DELETE": "delete"}.get(request.method.value.upper(), "")
            self.verbs.add((agent, str(request.resource.group or ""), plural or "", request.subresource, verb))
        if request.action in (kmock_enums.action.LIST, kmock_enums.action.WATCH):
            self.reads.append((agent, plural or "", "watch" if request.action == kmock_enums.action.WATCH else "list",
                               request.params.get("labelSelector", "")))
        # kmock matches each request against every request it has kept (O(n²) over a test): keep only those in
        # flight, which its matching needs; `log` above is the history.
        if request.method.value.upper() == "DELETE" and plural == "jobs" and request.name:
            options = request.data if isinstance(request.data, dict) else {}
            self.deletions[request.name] = request.params.get("propagationPolicy") or \
                options.get("propagationPolicy") or ""
        if (request.method.value.upper() == "POST" and plural == "jobs" and self.enforce_owner_refs
                and not self.finalizers_granted and isinstance(request.data, dict)
                and any(o.get("blockOwnerDeletion") for o in request.data.get("metadata", {}).get("ownerReferences")
                        or [])):
            raise kmock.KubernetesError(status=403, reason="Forbidden",
                                        message="cannot set blockOwnerDeletion if an ownerReference refers to a "
                                                "resource you can't set finalizers on")
        self._inflight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
        try:
            if request.resource is not None and request.action in (kmock_enums.action.CREATE,
                                                                   kmock_enums.action.UPDATE):
                data = self._stamp(request)
                if data is not None:
                    object.__setattr__(request, "data", data)  # Request is frozen; evolve() loses its routing
            return await super()._handle(request)
        finally:
            self._inflight.discard(id(request))

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:  # kmock's private method
        """kmock's object lookup, by key where the request names one object: kmock compares every stored object with
        every request (O(n) per request), which made the emulator, not the operator, the bottleneck at scale."""
        if request.name is not None and (strict or request.namespace is not None):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        return [obj for (res, ns, _), obj in self._objects.items()
                if res == request.resource and (ns == request.namespace or (not strict and request.namespace is None))]

    async def _serve_list(self, request: Any) -> Any:
        """kmock's list, filtered by the request's labelSelector as the API server filters it (kmock ignores it)."""
        match = _selector(request)
        result = await super()._serve_list(request)
        result["items"] = [o for o in result["items"] if match(o)]
        self._note_served(request, result["items"])
        return result

    async def _serve_watch(self, request: Any) -> Any:
        """kmock's watch, filtered by the labelSelector as the API server filters it: an object that stops matching
        is sent as DELETED, one that starts matching as ADDED."""
        match = _selector(request)
        matching: set[tuple[str, str]] = set()
        sent = (request.headers.get("User-Agent", "") or "", request.resource.plural if request.resource else "")
        async for event in super()._serve_watch(request):
            obj = event.get("object") if isinstance(event, dict) else None
            if not isinstance(obj, dict):
                yield event
                continue
            key = (obj.get("metadata", {}).get("namespace", ""), obj.get("metadata", {}).get("name", ""))
            if match(obj):
                kind = "ADDED" if key not in matching and event.get("type") == "MODIFIED" else event.get("type")
                (matching.discard if kind == "DELETED" else matching.add)(key)
                self._note_served(request, [obj])
                self.watch_events[sent] += 1
                yield {**event, "type": kind}
            elif key in matching:
                matching.discard(key)
                self.watch_events[sent] += 1
                yield {**event, "type": "DELETED"}

    def _note_served(self, request: Any, objs: list[dict[str, Any]]) -> None:
        agent = request.headers.get("User-Agent", "") or ""
        plural = request.resource.plural if request.resource is not None else ""
        for obj in objs:
            meta = obj.get("metadata", {})
            self.served.add((agent, plural, meta.get("namespace", ""), meta.get("name", "")))

    def _stamp(self, request: Any) -> Any:
        res = str(request.resource.group or "") + "/" + str(request.resource.version) + "/" + \
            str(request.resource.plural)
        res = res.lstrip("/")
        rv = str(next(self._rv))
        if request.action == kmock_enums.action.CREATE:
            data = copy.deepcopy(request.data)
            meta = data.setdefault("metadata", {})
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("namespace", request.namespace)
            if not meta.get("name") and meta.get("generateName"):  # kopf names its Events this way
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:8]
            meta.update(resourceVersion=rv, creationTimestamp=now_iso(), generation=1)
            if res == RUNS and self.validate_runs:
                data = crdcheck.defaulted(data)
                errs = crdcheck.errors(data)
                if errs:
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="; ".join(f"{p}: {m}" for p, m in errs))
            return data
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        old = self.objects[key].raw
        data = copy.deepcopy(request.data)
        sent_rv = data.get("metadata", {}).get("resourceVersion") if isinstance(data, dict) else None
        if sent_rv and sent_rv != old.get("metadata", {}).get("resourceVersion"):
            # A resourceVersion in an update or patch is a precondition, as the API server checks it.
            raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
        if isinstance(data, list):  # JSON patch (kopf uses it for finalizers, with a resourceVersion test)
            for op in data:
                if op.get("op") == "test" and jsonpointer.resolve_pointer(old, op["path"], None) != op.get("value"):
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=f"test failed: {op['path']}")
            return [*data, {"op": "add", "path": "/metadata/resourceVersion", "value": rv}]
        new = kmock_dicts.patch_dict(copy.deepcopy(old), data)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = rv
        if request.subresource != "status" and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1
            if res == RUNS and self.validate_runs:
                errs = crdcheck.update_errors(old, new)
                if errs:
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="; ".join(f"{p}: {m}" for p, m in errs))
        return data


_REQUIREMENT = re.compile(r"\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
                          r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)"
                          r"|\s+(?P<set>in|notin)\s*\((?P<values>[\w.,\s-]*)\))?)\s*")


def label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A Kubernetes label selector (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, joined by
    commas: all must hold) as a test on a labels dict. Raises ValueError on anything else."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^(]*\))", text) if text.strip() else []:
        m = _REQUIREMENT.fullmatch(part)
        if m is None:
            raise ValueError(f"unable to parse requirement: {part!r}")
        key, value = m["key"] or m["nkey"], m["value"]
        values = frozenset(v.strip() for v in (m["values"] or "").split(","))
        if m["not"]:
            tests.append(lambda labels, k=key: k not in labels)
        elif m["op"] in ("=", "=="):
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m["op"] == "!=":
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif m["set"] == "in":
            tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
        elif m["set"] == "notin":
            tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            tests.append(lambda labels, k=key: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def _selector(request: Any) -> Callable[[dict[str, Any]], bool]:
    """Whether an object matches the request's labelSelector (all do without one); a bad selector is a 400."""
    try:
        test = label_selector(request.params.get("labelSelector", ""))
    except ValueError as e:
        raise kmock.KubernetesError(status=400, reason="BadRequest", message=str(e)) from None
    return lambda obj: test(obj.get("metadata", {}).get("labels") or {})


def _parse_path(path: str, parse: Callable[[str], Any] = kmock_parsing.parse_path) -> Any:
    """kmock's path parser, plus the Namespace resource itself: kmock reads `/api/v1/namespaces[/<name>]` (what kopf's
    namespace scanning lists) as a namespaced path and fails on it."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) <= 4:
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None)
    return parse(path)


kmock_parsing.parse_path = _parse_path


def register(emulator: kmock.KubernetesEmulator) -> None:
    info = kmock.ResourceInfo
    emulator.resources[RUNS] = info(kind="AlignmentRun", namespaced=True, verbs=VERBS, subresources={"status"},
                                    shortnames={"arun"})
    emulator.resources[JOBS] = info(kind="Job", namespaced=True, verbs=VERBS, subresources={"status"})
    emulator.resources["v1/events"] = info(kind="Event", namespaced=True, verbs=VERBS)
    emulator.resources["v1/secrets"] = info(kind="Secret", namespaced=True, verbs=VERBS)
    emulator.resources["coordination.k8s.io/v1/leases"] = info(kind="Lease", namespaced=True, verbs=VERBS)
    emulator.resources["v1/services"] = info(kind="Service", namespaced=True, verbs=VERBS)
    emulator.resources["v1/pods"] = info(kind="Pod", namespaced=True, verbs=VERBS, subresources={"status"})
    emulator.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=VERBS)
    emulator.resources[WORKLOADS] = info(kind="Workload", namespaced=True, verbs=VERBS)
    emulator.resources[PODGROUPS] = info(kind="PodGroup", namespaced=True, verbs=VERBS)  # scheduler-plugins
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS)  # kopf's scanning watches them


@dataclass
class Cluster:
    emulator: Emulator
    url: str
    session: aiohttp.ClientSession

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                      agent: str = "test-client") -> tuple[int, Any]:
        headers = {"Content-Type": content_type, "User-Agent": agent}
        async with self.session.request(method, self.url + path, data=None if body is None else json.dumps(body),
                                        headers=headers) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None)

    async def create_run(self, doc: dict[str, Any]) -> tuple[int, Any]:
        ns = doc["metadata"].setdefault("namespace", "ns")
        return await self.request("POST", f"/apis/spa.dev/v1alpha1/namespaces/{ns}/alignmentruns", doc)

    async def patch_run(self, name: str, patch: dict[str, Any], ns: str = "ns") -> tuple[int, Any]:
        return await self.request("PATCH", f"/apis/spa.dev/v1alpha1/namespaces/{ns}/alignmentruns/{name}", patch,
                                  "application/merge-patch+json")

    async def delete_run(self, name: str, ns: str = "ns") -> tuple[int, Any]:
        return await self.request("DELETE", f"/apis/spa.dev/v1alpha1/namespaces/{ns}/alignmentruns/{name}")

    async def create_secret(self, name: str, data: dict[str, str], ns: str = "ns") -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
        status, _ = await self.request("POST", f"/api/v1/namespaces/{ns}/secrets", body)
        assert status in (200, 201), status

    def _object(self, resource: str, ns: str, name: str) -> Any:
        for (res, n, nm), obj in list(self.emulator.objects.items()):
            if res == resource and n == ns and nm == name:
                return obj
        return None

    def run(self, name: str, ns: str = "ns") -> dict[str, Any] | None:
        obj = self._object(RUNS, ns, name)
        return None if obj is None or obj.deleted else json.loads(json.dumps(obj.raw))

    def run_history(self, name: str, ns: str = "ns") -> list[dict[str, Any]]:
        obj = self._object(RUNS, ns, name)
        return [] if obj is None else [json.loads(json.dumps(v.raw)) for v in obj.history if v is not None]

    def secret_data(self, name: str, ns: str) -> dict[str, str] | None:
        obj = self._object("v1/secrets", ns, name)
        return None if obj is None or obj.deleted else dict(obj.raw.get("data", {}))

    def jobs(self, ns: str = "ns") -> dict[str, dict[str, Any]]:
        out = {}
        for (res, n, name), obj in list(self.emulator.objects.items()):
            if res == JOBS and n == ns and not obj.deleted:
                out[name] = json.loads(json.dumps(obj.raw))
        return out

    def pods(self, ns: str = "ns") -> dict[str, dict[str, Any]]:
        return {name: json.loads(json.dumps(obj.raw)) for (res, n, name), obj in list(self.emulator.objects.items())
                if res == "v1/pods" and n == ns and not obj.deleted}

    def all_jobs_ever(self) -> list[str]:
        return sorted(name for (res, _, name) in self.emulator.objects if res == JOBS)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(obj.raw)) for (res, _, _), obj in list(self.emulator.objects.items())
                if res == "v1/events" and not obj.deleted]

    def writes(self, exclude_agents: tuple[str, ...] = ("harness", "test-client")) -> list[tuple[str, str, str | None]]:
        """(method, resource, subresource) of every write request not made by the tests themselves."""
        return [(m, plural, sub) for m, agent, plural, sub in self.emulator.log
                if m in ("POST", "PATCH", "PUT", "DELETE") and not agent.startswith(exclude_agents)]


@contextlib.asynccontextmanager
async def start_cluster(validate_runs: bool = True) -> Any:
    emulator = Emulator(validate_runs=validate_runs)
    register(emulator)
    async with emulator, kmock.Server(emulator) as server, aiohttp.ClientSession() as session:
        yield Cluster(emulator, str(server.url).rstrip("/"), session)


async def stream_events(cluster: Cluster, path: str, handle: Callable[[dict[str, Any]], Any]) -> None:
    """Watch `path` for ever as the harness (a controller of the emulated cluster), reconnecting after errors."""
    url = cluster.url + path
    while True:
        try:
            async with cluster.session.get(url, headers={"User-Agent": "harness"},
                                           timeout=aiohttp.ClientTimeout(total=None)) as r:
                async for line in r.content:
                    if line.strip():
                        await handle(json.loads(line))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reconnect, like a controller would
            log.warning(f"harness watch error: {e!r}")
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------------- the Job controller

# (job, index, pod attempt) -> None | fail | bad-input | disrupt | "pending:<waiting reason>" (the pod never starts)
Fault = Callable[[dict[str, Any], int, int], "str | None"]


@dataclass
class PodResult:
    exit_code: int
    disrupted: bool = False


@dataclass
class Harness:
    """Plays the Job controller (and kubelet) against the emulator: watch Jobs, run pods, write Job status."""

    cluster: Cluster
    env: dict[str, str]  # the base env of every pod (PATH, offline flags...) — never credentials
    stub: bool = False  # run tests/operator/stub_worker.py instead of the real spa-worker
    stub_seconds: float = 1.0
    fault: Fault | None = None
    instant: bool = False  # complete every Job without running anything (benchmark)...
    instant_after: Callable[[], float] | None = None  # ...after this many seconds (default: at once)
    on_instant: Callable[[dict[str, Any]], None] | None = None
    # ...with a pod object each, and the status writes a cluster makes on the way: the pod Pending while its
    # container is created, then Running; the Job's active and ready counts; then the pod Succeeded.
    instant_pods: bool = False
    before_finish: Callable[[dict[str, Any]], Any] | None = None  # awaited before a Job's final status is written
    max_pods: int = 2
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="harness-")))
    created: dict[str, float] = field(default_factory=dict)  # job -> time seen
    finished: dict[str, float] = field(default_factory=dict)  # job -> time status written
    pods: list[tuple[str, int, int, int]] = field(default_factory=list)  # (job, index, pod attempt, exit)
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _procs: dict[str, set[asyncio.subprocess.Process]] = field(default_factory=dict)
    _pods: dict[str, set[str]] = field(default_factory=dict)  # job -> its pod objects
    _orphaned: dict[str, Any] = field(default_factory=dict)  # job deleted without propagation -> its pods' task
    _slots: asyncio.Semaphore | None = None
    _watch: asyncio.Task | None = None
    _pod_watch: asyncio.Task | None = None
    _pod_procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)  # pod -> its container
    ended: dict[str, float] = field(default_factory=dict)  # pod -> time its container ended

    async def __aenter__(self) -> Harness:
        self._slots = asyncio.Semaphore(self.max_pods)
        self._watch = asyncio.create_task(self._watch_jobs())
        self._pod_watch = asyncio.create_task(self._stream("/api/v1/pods?watch=true", self._on_pod_event))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._watch:
            self._watch.cancel()
        if self._pod_watch:
            self._pod_watch.cancel()
        for name in list(self._tasks):
            await self._kill(name)
        for name, task in list(self._orphaned.items()):
            self._tasks[name] = task
            await self._kill(name)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            if self._watch:
                await self._watch

    async def _watch_jobs(self) -> None:
        await self._stream("/apis/batch/v1/jobs?watch=true", self._on_event)

    async def _on_pod_event(self, event: dict[str, Any]) -> None:
        """A pod deleted (by the operator, an orphan) stops its container, as the kubelet would."""
        if event.get("type") == "DELETED":
            proc = self._pod_procs.get((event.get("object") or {}).get("metadata", {}).get("name", ""))
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    async def _stream(self, path: str, handle: Callable[[dict[str, Any]], Any]) -> None:
        await stream_events(self.cluster, path, handle)

    async def _on_event(self, event: dict[str, Any]) -> None:
        job = event.get("object") or {}
        name = job.get("metadata", {}).get("name", "")
        if event.get("type") == "DELETED":
            # As the garbage collector does: with a propagation policy the pods go with the Job; without one (the
            # API's default for Jobs) they are orphaned and run on.
            if self.cluster.emulator.deletions.get(name) in ("Foreground", "Background"):
                await self._kill(name)
                await self._delete_pods(name)
            else:
                self._orphaned[name] = self._tasks.pop(name, None)
            return
        status = job.get("status") or {}
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in status.get("conditions") or []):
            return
        suspended = bool((job.get("spec") or {}).get("suspend"))
        running = name in self._tasks and not self._tasks[name].done()
        if suspended and running:
            await self._kill(name)
            await self._write(job, {"active": None})
            return
        if suspended or running:
            return
        self.created.setdefault(name, time.monotonic())
        if self.instant:
            self._tasks[name] = asyncio.create_task(self._complete_now(job))
        else:
            self._tasks[name] = asyncio.create_task(self._run_job(job))

    async def _kill(self, name: str) -> None:
        for proc in list(self._procs.get(name, ())):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        task = self._tasks.pop(name, None)
        if task and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _api(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        async with self.cluster.session.request(method, self.cluster.url + path,
                                                data=None if body is None else json.dumps(body),
                                                headers={"Content-Type": content_type, "User-Agent": "harness"}) as r:
            text = await r.text()
            return json.loads(text) if text else None

    async def _pod(self, job: dict[str, Any], index: int, pod_attempt: int, status: dict[str, Any]) -> str:
        """Create the pod object (labels and annotations from the Job's template, as the Job controller does)."""
        meta, template = job["metadata"], job["spec"]["template"]
        name = f"{meta['name']}-{index}-{pod_attempt}"
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": meta["namespace"],
                             "labels": {**template["metadata"].get("labels", {}), "job-name": meta["name"]},
                             "annotations": dict(template["metadata"].get("annotations", {})),
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                  "uid": meta.get("uid", ""), "controller": True}]},
                "spec": template["spec"], "status": status}
        await self._api("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", body)
        self._pods.setdefault(meta["name"], set()).add(name)
        return name

    async def _pod_phase(self, job: dict[str, Any], pod: str, phase: str) -> None:
        path = f"/api/v1/namespaces/{job['metadata']['namespace']}/pods/{pod}/status"
        await self._api("PATCH", path, {"status": {"phase": phase}}, "application/merge-patch+json")

    async def _delete_pods(self, job: str) -> None:
        for pod in self._pods.pop(job, set()):
            await self._api("DELETE", f"/api/v1/namespaces/ns/pods/{pod}")

    async def _write(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        meta = job["metadata"]
        path = f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}/status"
        async with self.cluster.session.patch(self.cluster.url + path, data=json.dumps({"status": status}),
                                              headers={"Content-Type": "application/merge-patch+json",
                                                       "User-Agent": "harness"}) as r:
            await r.read()

    async def _complete_now(self, job: dict[str, Any]) -> None:
        pod = None
        if self.instant_pods:
            pod = await self._pod(job, 0, 1, {"phase": "Pending", "containerStatuses": [
                {"name": "worker", "ready": False, "state": {"waiting": {"reason": "ContainerCreating"}}}]})
            await self._write(job, {"active": 1, "ready": 0, "startTime": now_iso()})
            await self._api("PATCH", f"/api/v1/namespaces/{job['metadata']['namespace']}/pods/{pod}/status",
                            {"status": {"phase": "Running", "containerStatuses": [
                                {"name": "worker", "ready": True, "state": {"running": {"startedAt": now_iso()}}}]}},
                            "application/merge-patch+json")
            await self._write(job, {"ready": 1})
        if self.instant_after is not None:
            await asyncio.sleep(self.instant_after())
        if self.on_instant:
            self.on_instant(job)
        if pod is not None:
            await self._pod_phase(job, pod, "Succeeded")
        await self._finish(job, True, "", "")

    async def _finish(self, job: dict[str, Any], ok: bool, reason: str, message: str, failed: int = 0) -> None:
        spec = job.get("spec") or {}
        if ok:
            status = {"active": None, "succeeded": spec.get("completions", 1), "completionTime": now_iso(),
                      "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now_iso()}]}
        else:
            status = {"active": None, "failed": failed, "conditions": [
                {"type": "Failed", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": now_iso()}]}
        await self._write(job, status)
        self.finished[job["metadata"]["name"]] = time.monotonic()

    async def _run_job(self, job: dict[str, Any]) -> None:
        spec = job["spec"]
        name = job["metadata"]["name"]
        await self._write(job, {"active": 1, "startTime": now_iso()})
        completions = spec.get("completions", 1) if spec.get("completionMode") == "Indexed" else 1
        deadline = spec.get("activeDeadlineSeconds")
        gang = _is_gang(job)
        ports = {"SPA_RENDEZVOUS_PORT": str(_free_port())} if gang else {}
        try:
            outcome = await asyncio.wait_for(self._run_indexes(job, completions, gang, ports), deadline)
        except TimeoutError:
            await self._kill_procs(name)
            await self._finish(job, False, "DeadlineExceeded", "Job was active longer than specified deadline", 1)
            return
        failures = [o for o in outcome if o is not None]
        if self.before_finish is not None:
            await self.before_finish(job)
        if not failures:
            await self._finish(job, True, "", "")
        else:
            reason, message = failures[0]
            await self._finish(job, False, reason, message, len(failures))

    async def _run_indexes(self, job: dict[str, Any], completions: int, gang: bool,
                           env: dict[str, str]) -> list[tuple[str, str] | None]:
        """Every index's outcome, in the order they ended; a gang's first failure fails the Job, whose other pods are
        then terminated (their outcomes follow it)."""
        tasks = [asyncio.create_task(self._run_index(job, i, gang, env)) for i in range(completions)]
        if not gang:
            return list(await asyncio.gather(*tasks))
        outcomes: list[tuple[str, str] | None] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                outcomes.append(await next_done)
                if outcomes[-1] is not None:
                    await self._kill_procs(job["metadata"]["name"])
        finally:
            for t in tasks:
                t.cancel()
        return outcomes

    async def _kill_procs(self, name: str) -> None:
        for proc in list(self._procs.get(name, ())):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _run_index(self, job: dict[str, Any], index: int, gang: bool = False,
                         env: dict[str, str] | None = None) -> tuple[str, str] | None:
        """Run pods for one completion index until success or a failure the policy does not ignore."""
        spec = job["spec"]
        backoff_limit = spec.get("backoffLimit", 6)
        counted = 0
        for pod_attempt in itertools.count(1):
            result = await self._run_pod(job, index, pod_attempt, gang, env or {})
            if result.exit_code == 0 and not result.disrupted:
                return None
            action, action_rule = _policy_action(spec.get("podFailurePolicy"), result)
            if action == "Ignore":
                continue  # a replacement pod; not counted against backoffLimit
            if action == "FailJob":
                pod, rule = f"{job['metadata']['namespace']}/{job['metadata']['name']}-{index}", action_rule
                return ("PodFailurePolicy",
                        f"Pod {pod} has condition DisruptionTarget matching FailJob rule at index {rule}"
                        if result.disrupted else
                        f"Container worker for pod {pod} failed with exit code {result.exit_code} matching FailJob "
                        f"rule at index {rule}")
            counted += 1
            if counted > backoff_limit:
                return ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        return None

    def _pod_env(self, job: dict[str, Any], index: int, scratch: Path) -> dict[str, str]:
        container = job["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        env = dict(self.env)
        ns = job["metadata"]["namespace"]
        subdomain = job["spec"]["template"]["spec"].get("subdomain")
        for item in container.get("env", []):
            if "value" in item:
                value = item["value"]
                for mount, vol in mounts.items():  # emptyDir volumes are scratch folders here
                    if value == mount or value.startswith(mount + "/"):
                        value = str(scratch / vol) + value[len(mount):]
                if subdomain and value.startswith(job["metadata"]["name"] + "-") and \
                        value.endswith("." + subdomain):
                    value = "127.0.0.1"  # a gang pod's DNS name: every "pod" here is on loopback
                env[item["name"]] = value
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                data = self.cluster.secret_data(ref["name"], ns)
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise RuntimeError(f"CreateContainerConfigError: secret {ref['name']} key {ref['key']}")
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        if job["spec"].get("completionMode") == "Indexed":
            env["JOB_COMPLETION_INDEX"] = str(index)
        return env

    async def _run_pod(self, job: dict[str, Any], index: int, pod_attempt: int, gang: bool = False,
                       extra_env: dict[str, str] | None = None) -> PodResult:
        verdict = self.fault(job, index, pod_attempt) if self.fault else None
        if verdict and verdict.startswith("pending:"):  # never starts: stays Pending until its Job is deleted
            reason = verdict.split(":", 1)[1]
            # Unschedulable: the scheduler's PodScheduled condition, and no container status (it has no node);
            # otherwise the kubelet's waiting reason of a placed pod's container (ImagePullBackOff...).
            status = ({"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}
                if reason == "Unschedulable" else {"phase": "Pending", "containerStatuses": [
                    {"name": "worker", "ready": False, "state": {"waiting": {"reason": reason}}}]})
            await self._pod(job, index, pod_attempt, status)
            await asyncio.Event().wait()
        assert self._slots is not None
        async with contextlib.nullcontext() if gang else self._slots:  # a gang's pods must all run to meet
            pod = await self._pod(job, index, pod_attempt, {"phase": "Running", "startTime": now_iso()})
            result = await self._run_container(job, index, pod_attempt, verdict, pod, extra_env or {})
            await self._pod_phase(job, pod, "Succeeded" if result.exit_code == 0 else "Failed")
            return result

    async def _run_container(self, job: dict[str, Any], index: int, pod_attempt: int, verdict: str | None,
                             pod: str, extra_env: dict[str, str]) -> PodResult:
        name = job["metadata"]["name"]
        if verdict in ("fail", "bad-input"):  # the container exits at once: 1, or 2 for bad input
            code = 2 if verdict == "bad-input" else 1
            self.pods.append((name, index, pod_attempt, code))
            return PodResult(code)
        container = job["spec"]["template"]["spec"]["containers"][0]
        cmd = list(container["command"])
        assert cmd[0] == "spa-worker", cmd
        cmd = [sys.executable, str(STUB_WORKER), *cmd[1:]] if self.stub else \
            [sys.executable, "-m", "spa_workers.cli", *cmd[1:]]
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-{index}-", dir=self.logdir))
        env = {**self._pod_env(job, index, scratch), **extra_env}
        if self.stub:
            env["STUB_SECONDS"] = str(self.stub_seconds)
        logf = open(self.logdir / f"{name}-{index}-{pod_attempt}.log", "wb")  # noqa: SIM115
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                                                    env=env, cwd=str(scratch))
        self._procs.setdefault(name, set()).add(proc)
        self._pod_procs[pod] = proc
        try:
            if verdict == "disrupt":  # preempted a moment after it started
                try:
                    await asyncio.wait_for(proc.wait(), 0.5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
                self.pods.append((name, index, pod_attempt, 137))
                return PodResult(137, disrupted=True)
            code = await proc.wait()
        finally:
            self._procs[name].discard(proc)
            self._pod_procs.pop(pod, None)
            self.ended[pod] = time.monotonic()
            logf.close()
        self.pods.append((name, index, pod_attempt, code))
        return PodResult(code)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("*.log")))


def _policy_action(policy: dict[str, Any] | None, result: PodResult) -> tuple[str, int]:
    """The first matching podFailurePolicy rule's (action, index), else ('Count', -1), as the Job controller does."""
    for i, rule in enumerate((policy or {}).get("rules", [])):
        codes = rule.get("onExitCodes")
        if codes and not result.disrupted:
            inside = result.exit_code in codes.get("values", [])
            if (codes.get("operator") == "In") == inside:
                return rule["action"], i
        for cond in rule.get("onPodConditions", []):
            if cond.get("type") == "DisruptionTarget" and result.disrupted:
                return rule["action"], i
    return "Count", -1


def _is_gang(job: dict[str, Any]) -> bool:
    """A multi-node stage: an Indexed Job whose pods have DNS names under a headless Service."""
    return job["spec"].get("completionMode") == "Indexed" and bool(job["spec"]["template"]["spec"].get("subdomain"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def pod_base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every pod gets besides its Job's env: the image's environment, here this venv; never credentials."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "SPA_HEARTBEAT_S",
            "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("SPA_HEARTBEAT_S", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {**env, **(extra or {})}


class TcpProxy:
    """A TCP forwarder in front of the S3 server that tests can take down (connection refused) and bring back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for w in list(self.conns):
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.conns |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.conns -= {writer, up_writer}


@dataclass
class Kueue:
    """Plays Kueue for Jobs with the kueue.x-k8s.io/queue-name label: one Workload per Job, owned by it and admitted
    at once (the Job is unsuspended); a Workload set inactive (spec.active: false) evicts its Job (suspends it) and
    keeps it unadmitted until it is active again. Kueue's own suspend is the Job's; nobody else's is honoured."""

    cluster: Cluster
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def __aenter__(self) -> Kueue:
        self._tasks = [asyncio.create_task(stream_events(self.cluster, "/apis/batch/v1/jobs?watch=true", self._job)),
                       asyncio.create_task(stream_events(self.cluster, f"/apis/{WORKLOADS}?watch=true",
                                                         self._workload))]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for task in self._tasks:
            task.cancel()

    async def _job(self, event: dict[str, Any]) -> None:
        meta = (event.get("object") or {}).get("metadata", {})
        queue = (meta.get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        if event.get("type") != "ADDED" or not queue:
            return
        ns = meta["namespace"]
        workload = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                    "metadata": {"name": f"job-{meta['name']}-{meta['uid'][:5]}", "namespace": ns,
                                 "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                                                      "uid": meta["uid"], "controller": True}]},
                    "spec": {"active": True, "queueName": queue}}
        await self.cluster.request("POST", f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{ns}/workloads", workload,
                                   agent="harness")

    async def _workload(self, event: dict[str, Any]) -> None:
        """Admit an active Workload's Job (unsuspend it); evict an inactive one's (suspend it)."""
        workload = event.get("object") or {}
        meta = workload.get("metadata", {})
        owner = next((o["name"] for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job"), None)
        if event.get("type") == "DELETED" or owner is None:
            return
        path = f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{owner}"
        status, job = await self.cluster.request("GET", path, agent="harness")
        if status != 200 or any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                                for c in (job.get("status") or {}).get("conditions") or []):
            return
        suspend = (workload.get("spec") or {}).get("active") is False
        if bool(job["spec"].get("suspend")) != suspend:
            await self.cluster.request("PATCH", path, {"spec": {"suspend": suspend}}, "application/merge-patch+json",
                                       agent="harness")
