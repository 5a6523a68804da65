"""The API calls the operator makes itself (kopf watches the runs), with aiohttp on the operator's loop.

Every name in a request path is quoted: a name from a run's spec (a Secret's) must not reach another path
(`../../other/secrets/aws`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from prometheus_client import Counter

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


class ApiError(Exception):
    """An API request answered with an error status. Of its body only the names of the fields the API server
    objected to are kept (its messages could echo values that were sent, such as credentials)."""

    def __init__(self, status: int, reason: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.fields = fields


def _fields(payload: bytes) -> tuple[str, ...]:
    """The field paths a Status body's details.causes name (a 422 says which field of the object was invalid)."""
    try:
        causes = (json.loads(payload).get("details") or {}).get("causes") or []
    except (ValueError, AttributeError):
        return ()
    return tuple(dict.fromkeys(str(c["field"])[:200] for c in causes if isinstance(c, dict) and c.get("field")))


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
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

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

    def _client(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:  # one session per loop (tests restart operators)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=64),
                                                  timeout=aiohttp.ClientTimeout(total=60))
            self._loop = loop
        return self._session

    async def _request(self, verb: str, method: str, path: str, body: Any = None,
                       content_type: str = "application/json", params: dict[str, str] | None = None) -> Any:
        if self.requests is not None:
            self.requests.labels(verb).inc()
        data = None if body is None else json.dumps(body)
        async with self._client().request(method, self._url(path), data=data, params=params,
                                          headers=self._headers(content_type if data else None)) as r:
            payload = await r.read()
            if r.status >= 400:
                raise ApiError(r.status, r.reason or "", _fields(payload))
            return json.loads(payload) if payload else None

    async def list_objects(self, path: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """The objects of a collection that carry label `selector`, and the list's resourceVersion."""
        answer = await self._request("list", "GET", path, params={"labelSelector": selector}) or {}
        return list(answer.get("items") or []), str((answer.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, path: str, selector: str, version: str,
                    timeout_s: int) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) of each watch event after `version`, until the API server ends the stream (timeout_s)."""
        import aiohttp

        if self.requests is not None:
            self.requests.labels("watch").inc()
        params = {"watch": "true", "labelSelector": selector, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_s)}
        if version:
            params["resourceVersion"] = version
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s + 30)
        async with self._client().get(self._url(path), params=params, timeout=timeout,
                                      headers=self._headers(None)) as r:
            if r.status >= 400:
                raise ApiError(r.status, r.reason or "", _fields(await r.read()))
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
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

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

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> str:
        """Patch a run's status; returns the run's new resourceVersion."""
        answer = await self._request("patch", "PATCH", f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/"
                                                       f"{_q(namespace)}/{crd.PLURAL}/{_q(name)}/status",
                                     {"status": status}, MERGE_PATCH)
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
