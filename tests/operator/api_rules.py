"""What a real kube-apiserver refuses or does that kmock does not, for the emulator in `cluster.py`: each rule cites
the Kubernetes behaviour it copies, so a test that relies on it relies on the real thing.

Always on (as on every API server):
- a body that is not JSON, or holds NaN/Infinity, is refused with 400 (Go's encoding/json has no such tokens);
- a body over 3 MiB is refused with 413, an object over etcd's 1.5 MiB request limit with 500;
- a resourceVersion in an update or patch is a precondition: a stale one is refused with 409 (in `cluster.Emulator`).

Switched on by a test (`Faults`): admission-webhook, ValidatingAdmissionPolicy, quota and RBAC denials (403, each
with its own message), API Priority and Fairness throttling (429 with Retry-After), requests that hang, slow answers,
watches that stall without closing, and watch bookmarks.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import kmock

# kube-apiserver's --max-request-bytes default (apiserver/pkg/server/config.go: "3 * 1024 * 1024", twice etcd's
# limit because JSON is larger than the protobuf stored); a larger body is answered 413 before it is decoded
# ("Request entity too large: limit is 3145728", kubernetes/kubernetes#105863).
MAX_REQUEST_BYTES = 3 * 1024 * 1024
# etcd's default --max-request-bytes (etcd docs, "System limits"): 1.5 MiB. A stored object over it is refused by
# etcd and the API server passes the error on as a 500 with etcd's message (kubernetes/kubernetes#74600, #112152).
ETCD_MAX_BYTES = int(1.5 * 1024 * 1024)


class _NonFinite(ValueError):
    pass


def _refuse_constant(token: str) -> Any:
    raise _NonFinite(token)


def decode_error(body: bytes, method: str) -> aiohttp.web.Response | None:
    """The 400 a real API server answers to a body Go's encoding/json cannot decode, or None if it decodes.

    Python's json accepts the bare tokens NaN, Infinity and -Infinity; Go's does not. The messages are the API
    server's: a create decodes the body with the JSON serializer ("couldn't get version/kind; json parse error: ..."),
    a merge patch with kjson.UnmarshalStrict ("error decoding patch: ...", endpoints/handlers/patch.go)."""
    if not body:
        return None
    try:
        json.loads(body, parse_constant=_refuse_constant)
        return None
    except _NonFinite as e:
        token = str(e)
        problem = ("invalid character 'I' in numeric literal" if token.startswith("-")
                   else f"invalid character '{token[0]}' looking for beginning of value")
    except ValueError as e:
        problem = f"invalid character: {e}"
    prefix = "error decoding patch: " if method == "PATCH" else "couldn't get version/kind; json parse error: "
    return status_response(400, "BadRequest", prefix + problem)


def too_large(body: bytes) -> aiohttp.web.Response | None:
    """413 for a body over --max-request-bytes (apiserver limitedReadBody), before anything else looks at it."""
    if len(body) <= MAX_REQUEST_BYTES:
        return None
    return status_response(413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_REQUEST_BYTES}")


def check_stored_size(obj: Any) -> None:
    """Raise the API server's 500 for an object etcd refuses to store (over 1.5 MiB)."""
    if len(json.dumps(obj)) > ETCD_MAX_BYTES:
        raise kmock.KubernetesError(status=500, reason="", message="etcdserver: request is too large", details={})


def status_response(code: int, reason: str, message: str, details: dict[str, Any] | None = None,
                    headers: dict[str, str] | None = None) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}
    return aiohttp.web.json_response(body, status=code, headers=headers)


# ------------------------------------------------------------------------------------------------------ denials


@dataclass(frozen=True)
class Denial:
    """A 403 as the API server sends it: a Status object with reason Forbidden, the message saying who refused."""

    message: str
    group: str
    plural: str
    name: str = ""
    reason: str = "Forbidden"
    code: int = 403

    def response(self) -> aiohttp.web.Response:
        details = {"group": self.group, "kind": self.plural, **({"name": self.name} if self.name else {})}
        return status_response(self.code, self.reason, self.message, details)


def _forbidden(group: str, plural: str, name: str, why: str) -> str:
    """apimachinery errors.NewForbidden: `<resource>.<group> "<name>" is forbidden: <why>` (no name: no quotes)."""
    resource = f"{plural}.{group}" if group else plural
    return f'{resource} "{name}" is forbidden: {why}' if name else f"{resource} is forbidden: {why}"


def rbac_denial(user: str, verb: str, group: str, plural: str, namespace: str, name: str = "") -> Denial:
    """The authorizer's refusal (apiserver endpoints/handlers/responsewriters/errors.go, forbiddenMessage)."""
    why = (f'User "{user}" cannot {verb} resource "{plural}" in API group "{group}" in the namespace '
           f'"{namespace}"')
    return Denial(_forbidden(group, plural, name, why), group, plural, name)


def quota_denial(group: str, plural: str, name: str, quota: str, resource: str, used: int, hard: int) -> Denial:
    """ResourceQuota admission (plugin/pkg/admission/resourcequota/controller.go: admission.NewForbidden with
    "exceeded quota: %s, requested: %s, used: %s, limited: %s")."""
    why = (f"exceeded quota: {quota}, requested: {resource}=1, used: {resource}={used}, "
           f"limited: {resource}={hard}")
    return Denial(_forbidden(group, plural, name, why), group, plural, name)


def webhook_denial(webhook: str, message: str, group: str, plural: str, name: str = "") -> Denial:
    """A validating admission webhook's refusal (apiserver admission/plugin/webhook/errors/statuserror.go,
    ToStatusErr: `admission webhook "<name>" denied the request: <its message>`, code 403 unless it set one; the
    reason is whatever the webhook returned, often empty)."""
    return Denial(f'admission webhook "{webhook}" denied the request: {message}', group, plural, name, reason="")


def policy_denial(policy: str, binding: str, message: str, group: str, plural: str, name: str = "") -> Denial:
    """A ValidatingAdmissionPolicy with validationActions [Deny] and reason Forbidden (admission/plugin/policy/
    validating: "ValidatingAdmissionPolicy '%s' with binding '%s' denied request: %s")."""
    return Denial(f"ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {message}",
                  group, plural, name)


def too_many_requests(retry_after: int) -> aiohttp.web.Response:
    """API Priority and Fairness (or max-in-flight) rejecting a request: 429, a Retry-After header and a plain-text
    body, not a Status object (apiserver/pkg/server/filters/priority-and-fairness.go, tooManyRequests)."""
    return aiohttp.web.Response(status=429, text="Too many requests, please try again later.\n",
                                headers={"Retry-After": str(retry_after)})


# -------------------------------------------------------------------------------------------------------- faults

Match = Callable[[Any], bool]  # a kmock Request -> whether the fault applies to it


@dataclass
class Faults:
    """What a test switches on in the emulator. Each callable gets the kmock Request (method, headers with the
    User-Agent, resource, namespace, name, subresource, params)."""

    deny: Callable[[Any], Denial | None] | None = None  # admission, quota or RBAC refusal of a request
    throttle: Callable[[Any], int | None] | None = None  # APF: answer 429 with this Retry-After (seconds)
    hang: Match | None = None  # never answer (until `release()`): a request lost in a stalled connection
    delay: Callable[[Any], float] | None = None  # answer after this many seconds
    stall_watch: Match | None = None  # a watch that sends its headers, then nothing, and never closes
    # Watch bookmarks for clients that ask (allowWatchBookmarks): kube-apiserver's cacher sends one every minute
    # (storage/cacher: defaultBookmarkFrequency) and one right before the watch's deadline. None: none at all.
    bookmark_s: float | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    hung: int = 0  # requests held by `hang` so far

    def release(self) -> None:
        """Let every hung request go on (and later ones through)."""
        self.hang = None
        self._released.set()

    async def before(self, request: Any) -> aiohttp.web.StreamResponse | None:
        """Apply the faults to one request: a response to send instead of serving it, or None to serve it."""
        if self.hang is not None and self.hang(request):
            self.hung += 1
            await self._released.wait()
        if self.delay is not None:
            seconds = self.delay(request)
            if seconds > 0:
                await asyncio.sleep(seconds)
        if self.throttle is not None:
            retry_after = self.throttle(request)
            if retry_after is not None:
                return too_many_requests(retry_after)
        if self.deny is not None:
            denial = self.deny(request)
            if denial is not None:
                return denial.response()
        return None


def busy(seed: int = 0, throttled: float = 0.04, late_s: float = 0.02) -> Faults:
    """A busy API server, for running the fault matrix under it (SPA_EMULATOR_BUSY=1): every answer up to `late_s`
    late, a `throttled` share of the operator's requests (its own and kopf's) answered 429 with Retry-After 1, and
    watch bookmarks every second."""
    rng = random.Random(seed)

    def operator(request: Any) -> bool:
        return (request.headers.get("User-Agent") or "").startswith(("spa-operator", "kopf"))

    return Faults(throttle=lambda request: 1 if operator(request) and rng.random() < throttled else None,
                  delay=lambda request: rng.uniform(0, late_s), bookmark_s=1.0)
