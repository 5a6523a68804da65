"""The API calls the operator makes itself (kopf watches the runs), with aiohttp on the operator's loop.

Every name in a request path is quoted: a name from a run's spec (a Secret's) must not reach another path
(`../../other/secrets/aws`). Every body is written with `contract.dumps` (no NaN/Infinity: the API server refuses
them with 400).

Three connection pools, so that no kind of request waits for another's connections: long-lived watches (and the
lists that start them: one pair per watched namespace and kind, any number), the reconcilers' reads and writes, and
the Lease (whose renewal must never queue behind anything). A 429 (API Priority and Fairness) is retried after the
server's Retry-After, as client-go does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from prometheus_client import Counter, Histogram
from spa_workers import contract

from spa_operator import crd

MERGE_PATCH = "application/merge-patch+json"
PLURALS = {"Job": "jobs", "Service": "services", "Pod": "pods", "Event": "events", "PodGroup": "podgroups"}
KUEUE_WORKLOADS = "/apis/kueue.x-k8s.io/v1beta1"


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    """The path of a collection in one namespace, or across all of them (namespace None)."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/{PLURALS[kind]}" if namespace is None else f"{base}/namespaces/{_q(namespace)}/{PLURALS[kind]}"


def event_body(involved: dict[str, Any], etype: str, reason: str, message: str, component: str,
               instance: str) -> dict[str, Any]:
    """A core/v1 Event about `involved` (an object reference: apiVersion, kind, name, namespace, uid)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"namespace": involved.get("namespace") or "default",
                         "generateName": f"{involved.get('name') or 'spa'}."},
            "type": etype, "reason": reason, "message": message, "action": reason, "involvedObject": involved,
            "source": {"component": component}, "reportingComponent": component, "reportingInstance": instance,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}


# Pools (see the module's docstring) and their connection limits; 0 is no limit.
WATCH, API, LEASE = "watch", "api", "lease"
POOL_LIMITS = {WATCH: 0, API: 64, LEASE: 2}
RETRIES_429 = 5  # a request throttled more often than this fails (the caller decides again later)
MAX_RETRY_AFTER_S = 10.0


class Fenced(Exception):
    """A write after this replica lost its Lease: refused before it is sent (another replica may act now)."""


class ApiError(Exception):
    """An API request answered with an error status. `str()` (what logs show) holds only the status, its reason and
    the names of the fields the API server objected to: its message could echo values that were sent. The message
    itself (`message`) is kept for the run's status and Events, which redact the run's secret values first."""

    def __init__(self, status: int, reason: str, fields: tuple[str, ...] = (), message: str = "",
                 status_reason: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.fields = fields
        self.message = message[:1000]
        self.status_reason = status_reason  # the Status object's reason (Forbidden, Conflict...), "" if none
        self.retry_after = retry_after


def _error(status: int, http_reason: str, payload: bytes, headers: Any) -> ApiError:
    """An ApiError from an error answer: a Status object (most errors) or plain text (APF's 429)."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    fields: tuple[str, ...] = ()
    message, status_reason = "", ""
    if isinstance(body, dict):
        causes = (body.get("details") or {}).get("causes") or [] if isinstance(body.get("details"), dict) else []
        fields = tuple(dict.fromkeys(str(c["field"])[:200] for c in causes if isinstance(c, dict) and c.get("field")))
        message, status_reason = str(body.get("message") or ""), str(body.get("reason") or "")
    elif payload:
        message = payload.decode(errors="replace").strip()
    retry_after = None
    with contextlib.suppress(ValueError, TypeError):
        retry_after = float(headers.get("Retry-After"))
    return ApiError(status, http_reason, fields, message, status_reason, retry_after)


# Kinds of 403: who refused, told apart by the API server's own message (the Status reason is Forbidden for all).
RBAC, QUOTA, ADMISSION = "rbac", "quota", "admission"


def forbidden_kind(e: ApiError) -> str:
    """Who refused a 403: RBAC (the authorizer: `User "x" cannot create resource "jobs" ...`), a ResourceQuota
    (`... is forbidden: exceeded quota: ...`), or admission (a webhook: `admission webhook "x" denied the request:
    ...`, a ValidatingAdmissionPolicy, or another admission plugin such as LimitRanger or NamespaceLifecycle)."""
    text = e.message
    if "exceeded quota" in text or "status unknown for quota" in text:
        return QUOTA
    if ("User " in text and " cannot " in text) or "cannot set blockOwnerDeletion" in text:
        return RBAC  # the authorizer, or OwnerReferencesPermissionEnforcement (a missing finalizers permission)
    return ADMISSION


class Created(NamedTuple):
    """What `KubeApi.create` found: the object created, or (409) the controlling owner's uid of the one that exists;
    and the object's own uid either way (what it creates next is owned by it)."""

    obj: dict[str, Any] | None
    owner: str | None
    uid: str = ""


class KubeApi:
    """The API calls the operator makes itself (kopf watches the runs), with aiohttp on the operator's loop.

    Credentials come from a kubernetes-client Configuration (in-cluster or kubeconfig; its token refresh hook runs on
    each call). The kubernetes client itself is not used for requests: run in threads it cost ~4x the CPU per call,
    and the threads' GIL hand-offs delayed the event loop that reacts to Job events."""

    def __init__(self, conf: Any, identity: str = "") -> None:
        self.conf = conf
        # The replica in the User-Agent: the API server's audit log tells which operator pod made a request.
        self.agent = f"spa-operator/{identity}" if identity else "spa-operator"
        self.requests: Counter | None = None
        self.latency: Histogram | None = None  # seconds per request by verb, connection waits included
        self._sessions: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fenced = False  # set the moment the Lease is lost: from then on only reads and the Lease go out

    def _ssl(self) -> Any:
        if not self.conf.host.startswith("https:"):
            return None
        if not self.conf.verify_ssl:
            return False
        ctx = ssl.create_default_context(cafile=self.conf.ssl_ca_cert)
        if self.conf.cert_file:
            ctx.load_cert_chain(self.conf.cert_file, self.conf.key_file)
        return ctx

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.agent}
        for auth in self.conf.auth_settings().values():  # refreshes an expiring token first
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if self.conf.username or self.conf.password:
            headers["Authorization"] = self.conf.get_basic_auth_token()
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _url(self, path: str) -> str:
        return self.conf.host.rstrip("/") + path

    def _client(self, pool: str = API) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # one set of sessions per loop (tests restart operators)
            self._sessions, self._loop = {}, loop
        session = self._sessions.get(pool)
        if session is None:
            session = self._sessions[pool] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=POOL_LIMITS[pool]),
                timeout=aiohttp.ClientTimeout(total=60))
        return session

    async def _request(self, verb: str, method: str, path: str, body: Any = None,
                       content_type: str = "application/json", params: dict[str, str] | None = None,
                       pool: str = API, timeout_s: float | None = None) -> Any:
        """One API call; a 429 is tried again after its Retry-After (at most RETRIES_429 times)."""
        import aiohttp

        if self.fenced and method != "GET" and pool != LEASE:
            raise Fenced(f"{verb} {path}: this replica no longer holds the Lease")
        data = None if body is None else contract.dumps(body)
        timeout = None if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        for attempt in range(RETRIES_429 + 1):
            if self.requests is not None:
                self.requests.labels(verb).inc()
            t0 = time.monotonic()
            async with self._client(pool).request(method, self._url(path), data=data, params=params, timeout=timeout,
                                                  headers=self._headers(content_type if data else None)) as r:
                payload = await r.read()
                if self.latency is not None:
                    self.latency.labels(verb).observe(time.monotonic() - t0)
                if r.status < 400:
                    return json.loads(payload) if payload else None
                error = _error(r.status, r.reason or "", payload, r.headers)
            if error.status != 429 or attempt == RETRIES_429:
                raise error
            await asyncio.sleep(min(error.retry_after or 1.0, MAX_RETRY_AFTER_S))
        raise AssertionError("unreachable")

    async def list_objects(self, path: str, selector: str, version: str = "0") -> tuple[list[dict[str, Any]], str]:
        """The objects of a collection that carry label `selector`, and the list's resourceVersion.

        `version` "0" (an informer's first list, as client-go's reflector does) lets the API server answer from its
        watch cache instead of a quorum read from etcd; "" asks for the most recent state (after a 410, when the
        cache may be older than what was already seen)."""
        params = {"labelSelector": selector, "resourceVersion": version} if version else {"labelSelector": selector}
        answer = await self._request("list", "GET", path, params=params, pool=WATCH) or {}
        return list(answer.get("items") or []), str((answer.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, path: str, selector: str, version: str, timeout_s: int,
                    idle_s: float) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) of each watch event after `version`, until the API server ends the stream (timeout_s).

        A stream silent for `idle_s` raises TimeoutError: a connection that died without closing (a NAT or proxy
        dropping it) would otherwise look like a quiet watch until the server's timeout, or for ever. With bookmarks
        asked for, kube-apiserver sends one every minute even when nothing changes, so a silence longer than that
        means the stream is gone."""
        import aiohttp

        if self.requests is not None:
            self.requests.labels("watch").inc()
        params = {"watch": "true", "labelSelector": selector, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=idle_s)
        async with self._client(WATCH).get(self._url(path), params=params, timeout=timeout,
                                           headers=self._headers(None)) as r:
            if r.status >= 400:
                raise _error(r.status, r.reason or "", await r.read(), r.headers)
            pending = b""
            async for chunk in r.content.iter_any():  # one JSON document per line; a line may span chunks
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        yield str(event.get("type") or ""), event.get("object") or {}

    async def post_event(self, involved: dict[str, Any], etype: str, reason: str, message: str,
                         component: str) -> None:
        body = event_body(involved, etype, reason, message, component, self.agent.partition("/")[2] or component)
        await self._request("create", "POST", collection_path("v1", "Event", body["metadata"]["namespace"]), body)

    async def close(self) -> None:
        if self._loop is asyncio.get_running_loop():
            for session in self._sessions.values():
                await session.close()
        self._sessions = {}

    async def create(self, body: dict[str, Any]) -> Created:
        """Create a Job or Service: the object as the API server stored it; on 409 (it exists), the uid of its
        controlling owner ("" if it has none), so the caller can tell its own object (a previous operator made it)
        from a stranger's."""
        meta = body["metadata"]
        path = collection_path(body["apiVersion"], body["kind"], meta["namespace"])
        try:
            created = await self._request("create", "POST", path, body) or {}
            return Created(created, None, str(created.get("metadata", {}).get("uid") or ""))
        except ApiError as e:
            if e.status != 409:
                raise
        existing = (await self._request("get", "GET", f"{path}/{_q(meta['name'])}") or {}).get("metadata", {})
        owners = existing.get("ownerReferences") or []
        return Created(None, next((o.get("uid", "") for o in owners if o.get("controller")), ""),
                       str(existing.get("uid") or ""))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete with its dependents (pods): without a propagation policy a Job's pods are orphaned and keep
        running. Foreground: the Job stays visible (with a deletionTimestamp) until its pods are gone."""
        path = f"{collection_path(api_version, kind, namespace)}/{_q(name)}"
        try:
            await self._request("delete", "DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1",
                                                           "propagationPolicy": "Foreground"})
        except ApiError as e:
            if e.status != 404:
                raise

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._request("patch", "PATCH", f"/apis/batch/v1/namespaces/{_q(namespace)}/jobs/{_q(name)}", patch,
                            MERGE_PATCH)

    async def list_workloads(self, namespace: str) -> list[dict[str, Any]]:
        """The Kueue Workloads of a namespace (API kueue.x-k8s.io/v1beta1; spec.active exists since Kueue 0.6)."""
        answer = await self._request("list", "GET", f"{KUEUE_WORKLOADS}/namespaces/{_q(namespace)}/workloads")
        return list((answer or {}).get("items") or [])

    async def patch_workload(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._request("patch", "PATCH", f"{KUEUE_WORKLOADS}/namespaces/{_q(namespace)}/workloads/{_q(name)}",
                            patch, MERGE_PATCH)

    def _run_path(self, namespace: str, name: str) -> str:
        return f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{_q(namespace)}/{crd.PLURAL}/{_q(name)}"

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], version: str | None = None) -> str:
        """Patch a run's status; returns the run's new resourceVersion. With `version`, only if the run is still at
        that resourceVersion (409 Conflict otherwise): a status decided from an older view of the run, by a replica
        that lost its Lease meanwhile say, never overwrites a newer one."""
        body: dict[str, Any] = {"status": status}
        if version:
            body["metadata"] = {"resourceVersion": version}
        answer = await self._request("patch", "PATCH", f"{self._run_path(namespace, name)}/status", body, MERGE_PATCH)
        return str(((answer or {}).get("metadata") or {}).get("resourceVersion") or "")

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = await self._request("get", "GET", f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def api_error(e: Exception) -> str:
    """A one-line API error without response bodies (which could echo what was sent)."""
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None) or type(e).__name__
    fields = getattr(e, "fields", ())
    where = f" ({', '.join(fields)})" if fields else ""
    return f"API error {status}: {reason}{where}" if status else f"API error: {reason}"
