"""Leader election with a coordination.k8s.io Lease: two operator replicas never act on the same run.

Chosen over kopf peering: peering needs kopf's own peering CRDs installed, and replicas of equal priority only warn
about each other and go on acting; a Lease is what Kubernetes controllers use and needs no CRD.

The holder renews the Lease every `renew_s`; another replica takes it over only after it saw the same record unchanged
for `duration_s` on its own clock (as client-go does: no trust in other machines' clocks). A holder that could not
renew for `duration_s` stops acting (the operator exits, and its pod restarts as a candidate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

from spa_operator.kubeapi import MERGE_PATCH, ApiError, KubeApi, _q

log = logging.getLogger("spa_operator.lease")


class LeaseLost(Exception):
    """This replica could not renew its Lease in time: another may act now, so this one must stop."""


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, api: KubeApi, namespace: str, name: str, identity: str, duration_s: float = 15.0,
                 renew_s: float = 5.0) -> None:
        self.api, self.identity = api, identity
        self.duration_s, self.renew_s = duration_s, renew_s
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{_q(namespace)}/leases/{_q(name)}"
        self.namespace, self.name = namespace, name
        self._seen: tuple[Any, float] | None = None  # (the other holder's record, when first seen unchanged)

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
            lease = await self.api._request("get", "GET", self.path)
        except ApiError as e:
            if e.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": self._spec(True)}
            try:
                await self.api._request("create", "POST", self.path.rsplit("/", 1)[0], body)
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
            await self.api._request("update", "PATCH", self.path, patch, MERGE_PATCH)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while True:
            try:
                if await self.try_acquire():
                    log.info(f"holding Lease {self.namespace}/{self.name} as {self.identity}")
                    return
            except Exception as e:  # the API server is away: keep trying
                log.warning(f"Lease {self.namespace}/{self.name}: {type(e).__name__}: {e}")
            if not announced:
                log.info(f"waiting for Lease {self.namespace}/{self.name} (another replica holds it)")
                announced = True
            await asyncio.sleep(self.renew_s)

    async def hold(self) -> None:
        """Renew until renewing fails for longer than the Lease lasts; then raise LeaseLost."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                if await self.try_acquire():
                    last = time.monotonic()
                    continue
            except Exception as e:
                log.warning(f"renewing Lease {self.namespace}/{self.name}: {type(e).__name__}")
            if time.monotonic() - last >= self.duration_s - self.renew_s:
                raise LeaseLost(f"could not renew Lease {self.namespace}/{self.name}")
