"""Leader election with a coordination.k8s.io Lease: two operator replicas never act on the same run.

Chosen over kopf peering: peering needs kopf's own peering CRDs installed, and replicas of equal priority only warn
about each other and go on acting; a Lease is what Kubernetes controllers use and needs no CRD.

The holder renews the Lease every `renew_s`; another replica takes it over only after it saw the same record unchanged
for `duration_s` on its own clock (as client-go does: no trust in other machines' clocks). A holder whose renewal is
not confirmed within `renew_deadline_s` of the last confirmed one (client-go's RenewDeadline, shorter than the
duration) stops acting at once: every request it makes is bounded by that deadline, so a hung renewal cannot keep it
acting while another replica takes over (the operator exits, and its pod restarts as a candidate). On shutdown the
holder releases the Lease (holderIdentity cleared, as client-go's ReleaseOnCancel), so the next replica takes over at
once instead of waiting out the duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from spa_operator.kubeapi import LEASE, MERGE_PATCH, ApiError, KubeApi, _q

log = logging.getLogger("spa_operator.lease")


class LeaseLost(Exception):
    """This replica could not renew its Lease in time: another may act now, so this one must stop."""


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, api: KubeApi, namespace: str, name: str, identity: str, duration_s: float = 15.0,
                 renew_s: float = 2.0, renew_deadline_s: float | None = None) -> None:
        renew_deadline_s = renew_deadline_s or duration_s * 2 / 3  # client-go's defaults: 15 s, 10 s
        if not renew_s < renew_deadline_s < duration_s:
            raise ValueError(f"Lease timings: need renew ({renew_s}s) < renew deadline ({renew_deadline_s}s) < "
                             f"duration ({duration_s}s)")
        self.api, self.identity = api, identity
        self.duration_s, self.renew_s, self.renew_deadline_s = duration_s, renew_s, renew_deadline_s
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{_q(namespace)}/leases/{_q(name)}"
        self.namespace, self.name = namespace, name
        self._seen: tuple[Any, float] | None = None  # (the other holder's record, when first seen unchanged)
        self.renewed = 0.0  # monotonic time of the last confirmed renewal (or acquisition)
        self.released = False  # given up on shutdown: `hold` returns

    async def _call(self, verb: str, method: str, path: str, body: Any = None, content_type: str = "application/json",
                    timeout_s: float | None = None) -> Any:
        return await self.api._request(verb, method, path, body, content_type, pool=LEASE,
                                       timeout_s=timeout_s or self.renew_deadline_s)

    def _spec(self, acquire: bool, old: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = dict(old or {})
        now = _micro_now()
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(int(self.duration_s), 1), renewTime=now)
        if acquire:
            spec.update(acquireTime=now, leaseTransitions=int(spec.get("leaseTransitions", 0) or 0) + (1 if old
                                                                                                       else 0))
        return spec

    async def try_acquire(self) -> bool:
        """Take or renew the Lease if it is free, ours, or its holder stopped renewing; True if held now."""
        try:
            lease = await self._call("get", "GET", self.path)
        except ApiError as e:
            if e.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(True)}
            try:
                await self._call("create", "POST", self.path.rsplit("/", 1)[0], body)
            except ApiError as e2:
                if e2.status == 409:  # another replica was faster
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder and holder != self.identity:
            record = (holder, spec.get("renewTime"))
            if self._seen is None or self._seen[0] != record:
                self._seen = (record, time.monotonic())
            duration = float(spec.get("leaseDurationSeconds") or self.duration_s)
            if time.monotonic() - self._seen[1] < duration:
                return False
        patch = {"metadata": {"resourceVersion": lease.get("metadata", {}).get("resourceVersion")},
                 "spec": self._spec(holder != self.identity, spec)}
        try:  # the resourceVersion in the patch makes it a compare-and-swap (409 if the Lease changed meanwhile)
            await self._call("update", "PATCH", self.path, patch, MERGE_PATCH)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while True:
            started = time.monotonic()
            try:
                if await self.try_acquire():
                    self.renewed = started
                    log.info(f"holding Lease {self.namespace}/{self.name} as {self.identity}")
                    return
            except Exception as e:  # the API server is away: keep trying
                log.warning(f"Lease {self.namespace}/{self.name}: {type(e).__name__}: {e}")
            if not announced:
                log.info(f"waiting for Lease {self.namespace}/{self.name} (another replica holds it)")
                announced = True
            await asyncio.sleep(self.renew_s)

    async def hold(self) -> None:
        """Renew every renew_s; raise LeaseLost as soon as no renewal was confirmed within renew_deadline_s of the
        last confirmed one (a renewal still in flight then is abandoned: its answer would come too late). Returns
        once the Lease was released."""
        while True:
            await asyncio.sleep(self.renew_s)
            while not self.released:
                left = self.renewed + self.renew_deadline_s - time.monotonic()
                if left <= 0:
                    raise LeaseLost(f"could not renew Lease {self.namespace}/{self.name} within "
                                    f"{self.renew_deadline_s:g}s")
                started = time.monotonic()
                try:
                    held = await asyncio.wait_for(self.try_acquire(), left)
                except Exception as e:  # refused, unreachable, or past the deadline (checked above, next round)
                    log.warning(f"renewing Lease {self.namespace}/{self.name}: {type(e).__name__}")
                    await asyncio.sleep(min(self.renew_s, max(self.renewed + self.renew_deadline_s - time.monotonic(),
                                                              0)))
                    continue
                if not held and not self.released:
                    raise LeaseLost(f"Lease {self.namespace}/{self.name} is held by another replica")
                self.renewed = started  # the Lease runs from when the renewal was sent, not when it was answered
                break
            if self.released:
                return

    async def release(self) -> None:
        """Give the Lease up (shutdown): holderIdentity cleared and a 1 s duration, with this replica's last
        resourceVersion as precondition, so a Lease another replica already took is left alone."""
        self.released = True
        try:
            lease = await self._call("get", "GET", self.path, timeout_s=2.0)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            patch = {"metadata": {"resourceVersion": lease.get("metadata", {}).get("resourceVersion")},
                     "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _micro_now()}}
            await self._call("update", "PATCH", self.path, patch, MERGE_PATCH, timeout_s=2.0)
            log.info(f"released Lease {self.namespace}/{self.name}")
        except Exception as e:  # the next replica then waits the Lease out
            log.warning(f"releasing Lease {self.namespace}/{self.name}: {type(e).__name__}")
