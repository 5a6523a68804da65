"""The Kubernetes executor's controller: for each run, observe (see `observe.Observer`), ask the decision core
(`reconcile.decide`), and carry the decision out: create a stage's Job and what it owns, delete, suspend and resume
Jobs, pause Kueue Workloads, publish the finished run's marker, patch the status (with a resourceVersion
precondition) and post Events. `kube` wires it to kopf; the watches it keeps are `informer`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from spa_operator import crd, jobs, reconcile, status
from spa_operator.config import Config
from spa_operator.core_types import Decision, JobView, Observed, PodView, Settings
from spa_operator.informer import Informer
from spa_operator.kubeapi import ADMISSION, QUOTA, ApiError, KubeApi, api_error, forbidden_kind
from spa_operator.lease import LeaseElector
from spa_operator.metrics import Metrics
from spa_operator.observe import PAUSED_ANNOTATION, Observer, RunState, job_view, older_version, pod_view
from spa_operator.runstore import ClientCache

# Jobs and pods are listed and watched with this labelSelector, applied by the API server: other workloads' objects
# never reach the operator.
RUN_OBJECTS_SELECTOR = jobs.LABEL_RUN_UID
COMPONENT = "spa-operator"


class RetrySoon(Exception):
    """A write failed: the daemon retries after `delay` seconds (None: cfg.retry_s)."""

    def __init__(self, delay: float | None = None) -> None:
        super().__init__()
        self.delay = delay


MAX_BACKOFF_S = 300.0  # the longest wait between two tries of a create the API server refused (403)


class Controller(Observer):
    """One per operator: observes each run (see `Observer`), asks `reconcile.decide`, and carries it out."""

    def __init__(self, cfg: Config, api: KubeApi) -> None:
        self.cfg = cfg
        self.api = api
        self.metrics = Metrics()
        api.requests = self.metrics.api_requests
        api.latency = self.metrics.api_latency
        self.runs: dict[str, RunState] = {}
        self.secrets: dict[tuple[str, str], tuple[float, dict[str, str] | None]] = {}
        self.clients = ClientCache()
        self.settings = Settings(cfg.pending_timeout_s, cfg.queued_timeout_s, cfg.allowed(),
                                 cfg.worker_service_account)
        self.healthy = False  # the process serves and works (liveness)
        self.leading = True  # False while a replica waits for the Lease
        self.elector: LeaseElector | None = None
        self.jobs: Informer[JobView] | None = None
        self.pods: Informer[PodView] | None = None

    # -- wiring ---------------------------------------------------------------------------------------------------

    def watch(self) -> list[asyncio.Task[None]]:
        """Start the Job and pod watches (on the running loop); reconcilers read their indexes once synced."""
        timing = dict(server_timeout_s=self.cfg.watch_timeout_s, idle_s=self.cfg.watch_idle_s, retry_s=self.cfg.retry_s)
        self.jobs = Informer(self.api, "batch/v1", "Job", RUN_OBJECTS_SELECTOR, job_view, self.job_event,
                             self.cfg.namespaces, **timing)
        self.pods = Informer(self.api, "v1", "Pod", RUN_OBJECTS_SELECTOR, pod_view, self.pod_event,
                             self.cfg.namespaces, **timing)
        return [asyncio.ensure_future(self.jobs.run()), asyncio.ensure_future(self.pods.run())]

    async def synced(self) -> None:
        for informer in (self.jobs, self.pods):
            if informer is not None:
                await informer.synced()

    def not_ready(self) -> str | None:
        """Why this replica does not serve runs yet (None: it does): it waits for the Lease, is starting, or one of
        its Job or pod watches has not listed its namespace yet (a run there would wait for it)."""
        if not self.leading:
            return "waiting for the Lease"
        if not self.healthy or self.jobs is None or self.pods is None:
            return "starting"
        for informer in (self.jobs, self.pods):
            waiting = informer.unsynced()
            if waiting:
                return (f"{informer.kind} watch not listed yet in {len(waiting)} of {len(informer.scopes)} "
                        f"namespace(s)")
        return None

    def pod_event(self, uid: str, namespace: str, pod: str, view: PodView | None) -> None:
        """A pod of run `uid` changed: wake the run's reconciler if the decision would see something new (most pod
        events, scheduling, IPs, readiness, change nothing decided). A pod that goes away while it may still run
        (an orphan's deletion the retry waits for) wakes it too."""
        rs = self.runs.get(uid)
        if rs is None or rs.namespace != namespace:  # a run's pods are in its own namespace (a copied label is not)
            return
        if view is None:
            last = rs.observed.get(("pod", pod))
            if isinstance(last, PodView) and last.live:
                rs.waker.set()
        elif rs.changed(view):
            rs.waker.set()

    def job_event(self, uid: str, namespace: str, job: str, view: JobView | None) -> None:
        """A Job of run `uid` changed (view None: it was deleted): remember it was seen and wake the run's
        reconciler, unless the decision would see nothing new (most Job events of a cluster: active pod counts,
        ready counts, start time; the ADDED event of a Job the reconciler created itself).

        Seen here, not in the reconciler: a Job created and deleted between two reconciles would otherwise never be
        known to have existed, and its stage would wait for it forever."""
        rs = self.runs.get(uid)
        if rs is not None and rs.namespace == namespace:
            rs.seen_jobs.add(job)
            if view is None:
                rs.expected.pop(job, None)
            if view is None or rs.changed(view):
                rs.waker.set()

    # -- acting ---------------------------------------------------------------------------------------------------

    async def reconcile(self, rs: RunState, body: Any, index: Any, logger: logging.Logger | logging.LoggerAdapter,
                        pod_index: Any = None, hold: bool = False) -> float | None:
        """Observe, decide, act; returns seconds until the next unprompted look (None: only when woken). With `hold`,
        only the decision's creates are carried out: the status patch, Events and the rest wait for the next
        reconcile, which decides again (the Jobs created are expected by then)."""
        meta = body.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return None
        rs.generation = meta.get("generation")
        rs.namespace = meta.get("namespace", "")
        if rs.stale is not None:  # a status patch was refused (409): wait until the newer version has arrived
            if not older_version(rs.stale, meta.get("resourceVersion")):
                return self.cfg.retry_s
            rs.stale = None
        obs = await self._observe(rs, body, index, pod_index)
        decision = reconcile.decide(obs)
        if rs.first_pass:  # a gang's Service and pod group come after its Job: a restart in between left them out
            await self._create(rs, body, obs, dataclasses.replace(decision, create=reconcile.running_gangs(obs)),
                               logger)
        refused, blocked = await self._create(rs, body, obs, decision, logger)
        if hold:
            rs.first_pass = False
            return None
        if refused or blocked:  # decide again knowing what the API server refused; nothing else is created
            obs = dataclasses.replace(obs, create_refused=refused, create_blocked=blocked and blocked[0],
                                      create_blocked_reason=blocked[1] if blocked else "JobCreationBlocked")
            decision = dataclasses.replace(reconcile.decide(obs), create=())
        elif decision.transition:
            finished = [v.finished_at for v in obs.jobs if v.finished_at]
            if finished:
                self.metrics.transition.observe(max(time.monotonic() - max(finished), 0.0))
        await self._act(rs, body, obs, decision, logger)
        if decision.publish is not None:
            await self._publish(rs, *decision.publish, logger)
        await self._write(rs, body, obs, decision.status, logger)
        for ev in decision.events:
            await self._event(body, ev.type, ev.reason, ev.message, rs, logger)
        rs.first_pass = False
        if decision.metrics is not None:
            self.metrics.export(obs.namespace, obs.name, decision.metrics)
        phase = decision.status.get("phase")
        if reconcile.terminal(decision.status):  # a run failed for an invalid spec may still be fixed: keep it
            rs.finished()
        if phase in (reconcile.SUCCEEDED, reconcile.FAILED):
            return None
        delays = [d for d in (decision.requeue_s,) if d is not None]
        if rs.denied is not None and blocked == rs.denied:
            delays.append(max(rs.denied_until - time.monotonic(), 0.0))
        elif obs.storage_problem or obs.secret_problem or blocked:
            delays.append(self.cfg.retry_s)
        elif any(r.get("state") == reconcile.RUNNING for r in decision.status.get("stages", [])):
            delays.append(min(self.cfg.timer_s, self.cfg.progress_s))
        else:
            delays.append(self.cfg.timer_s)
        return min(delays)

    async def _create(self, rs: RunState, body: Any, obs: Observed, decision: Decision,
                      logger: Any) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Create every object of each stage attempt to start, in order. Returns (stage key -> why the API refused
        it for good, (why creating must wait, its condition reason)), from the answers.

        A create the API server refused with 403 is not tried again before its backoff ran out (doubling from
        retry_s up to MAX_BACKOFF_S): events of the run's other objects wake the reconciler often, and each would
        otherwise send the refused request again."""
        refused: dict[str, str] = {}
        if not decision.create:
            return refused, None
        if rs.denied is not None and time.monotonic() < rs.denied_until:
            return refused, rs.denied
        ref = jobs.RunRef(name=obs.name, namespace=obs.namespace, uid=rs.uid,
                          api_version=body.get("apiVersion", f"{crd.GROUP}/{crd.VERSION}"),
                          kind=body.get("kind", crd.KIND))
        for todo in decision.create:
            objects = jobs.build_stage_objects(todo.stage, todo.attempt, ref, obs.spec, self.cfg.worker_image,
                                               self.cfg.worker_service_account, self.cfg.worker_metrics_port,
                                               self.cfg.pod_defaults, self.cfg.gang_scheduling)
            job_uid = ""
            for obj in objects:  # the Job first; what it owns (Service, pod group) gets its uid
                if obj["kind"] != "Job":
                    obj = jobs.owned_by(obj, job_uid)
                what = f"{obj['kind']} {obj['metadata']['name']}"
                try:
                    created, owner, uid = await self.api.create(obj)
                except ApiError as e:
                    if e.status == 403:
                        return refused, self._denied(rs, obj, what, e, logger)
                    if 400 <= e.status < 500 and e.status not in (401, 408, 409, 429):
                        refused[todo.stage.key] = f"{what}: {api_error(e)}"
                        break
                    logger.warning(f"creating {what} failed: {api_error(e)}; will retry")
                    return refused, (f"creating {what} failed: {api_error(e)}", "JobCreationBlocked")
                except Exception as e:  # the API server is unreachable
                    logger.warning(f"creating {what} failed: {type(e).__name__}; will retry")
                    return refused, (f"creating {what} failed: {type(e).__name__}", "JobCreationBlocked")
                rs.denied, rs.denials = None, 0
                if obj["kind"] == "Job":
                    job_uid = uid
                if owner is not None and owner != (rs.uid if obj["kind"] == "Job" else job_uid):
                    return refused, (f"{what} already exists and belongs to another owner (uid {owner or 'none'}); "
                                     f"it must be deleted before this run can go on", "JobCreationBlocked")
                if created is not None and obj["kind"] == "Job":
                    rs.created(job_view(created))
        return refused, None

    def _denied(self, rs: RunState, obj: dict[str, Any], what: str, e: ApiError,
                logger: Any) -> tuple[str, str]:
        """A 403 on create, told apart by who refused it, with the refusal's own message (redacted where written)."""
        kind = forbidden_kind(e)
        said = e.message or api_error(e)
        if kind == QUOTA:
            blocked = (f"creating {what} is refused by a ResourceQuota ({said}); tried again as quota frees up",
                       "QuotaExceeded")
        elif kind == ADMISSION:
            blocked = (f"creating {what} was denied by admission ({said})", "AdmissionDenied")
        else:
            blocked = (f"creating {what} is forbidden ({said}): the operator needs create on "
                       f"{obj['kind'].lower()}s and update on alignmentruns/finalizers (ownerReferences with "
                       f"blockOwnerDeletion); see the chart's RBAC", "Forbidden")
        backoff = min(self.cfg.retry_s * 2 ** rs.denials, MAX_BACKOFF_S)
        rs.denied, rs.denials, rs.denied_until = blocked, rs.denials + 1, time.monotonic() + backoff
        logger.warning(f"creating {what} refused ({kind}, {api_error(e)}); trying again in {backoff:g}s")
        return blocked

    async def _act(self, rs: RunState, body: Any, obs: Observed, decision: Decision,
                   logger: Any) -> None:
        ns = obs.namespace
        for pod in decision.delete_pods:
            await self._try(logger, f"delete orphaned pod {pod}", self.api.delete("v1", "Pod", ns, pod))
        for job in decision.delete_jobs:
            await self._try(logger, f"delete Job {job}", self.api.delete("batch/v1", "Job", ns, job))
        for job in decision.suspend_jobs:
            await self._try(logger, f"suspend Job {job}", self.api.patch_job(ns, job, {"spec": {"suspend": True}}))
        for job in decision.resume_jobs:
            await self._try(logger, f"resume Job {job}", self.api.patch_job(ns, job, {"spec": {"suspend": False}}))
        for wl in decision.deactivate_workloads:
            await self._try(logger, f"pause Kueue Workload {wl}", self.api.patch_workload(
                ns, wl, {"metadata": {"annotations": {PAUSED_ANNOTATION: rs.uid}}, "spec": {"active": False}}))
        for wl in decision.activate_workloads:
            await self._try(logger, f"reactivate Kueue Workload {wl}", self.api.patch_workload(
                ns, wl, {"metadata": {"annotations": {PAUSED_ANNOTATION: None}}, "spec": {"active": True}}))
        if decision.status.get("phase") == reconcile.FAILED and not reconcile.terminal(obs.status):
            logger.warning(f"run failed: {decision.status.get('message', '')}")

    @staticmethod
    async def _publish(rs: RunState, uri: str, text: str, logger: Any) -> None:
        """The finished run's marker in storage; the status says Succeeded only once it is there."""
        try:
            if rs.store is None:  # never: a run is decided Succeeded only from manifests read through its store
                raise RuntimeError("no storage client")
            await asyncio.to_thread(rs.store.write_text, uri, text)
        except Exception as e:
            logger.warning(f"could not write {uri}: {type(e).__name__}: {e}; will retry")
            raise RetrySoon from None

    @staticmethod
    async def _try(logger: Any, what: str, call: Any) -> None:
        try:
            await call
        except Exception as e:  # the next reconcile decides again
            logger.warning(f"could not {what}: {api_error(e)}")

    async def _write(self, rs: RunState, body: Any, obs: Observed, new: dict[str, Any], logger: Any) -> None:
        """Patch the status to `new`, only if the run is still at the resourceVersion it was observed at. On 409
        someone else wrote in between (a user, or a replica that took the Lease over): a status decided from the
        older view must not overwrite theirs, so the run is decided again once their version has arrived."""
        old = obs.status
        patch = status.merge_patch(old, new)
        if not patch:
            return
        patch = status.redacted(patch, rs.secrets)  # only inside strings: numbers and the shape stay intact
        meta = body.get("metadata", {})
        ns, name = meta.get("namespace", "default"), meta.get("name", "")
        try:
            version = await self.api.patch_status(ns, name, patch, rs.basis)
        except ApiError as e:
            if e.status == 409:  # decide again once the newer version reaches the run's watch (it wakes this run)
                logger.info("the run changed since it was read; deciding again from the newer version")
                rs.stale, rs.written = rs.basis, None
                raise RetrySoon from None
            logger.warning(f"status update failed: {api_error(e)}; will retry")
            raise RetrySoon from None
        except Exception as e:
            logger.warning(f"status update failed: {api_error(e)}; will retry")
            raise RetrySoon from None
        rs.written = (version, {k: v for k, v in {**old, **patch}.items() if v is not None}) if version else None

    async def _event(self, body: Any, etype: str, reason: str, message: str, rs: RunState | None,
                     logger: Any) -> None:
        meta = body.get("metadata", {})
        involved = {"apiVersion": body.get("apiVersion", f"{crd.GROUP}/{crd.VERSION}"),
                    "kind": body.get("kind", crd.KIND), "name": meta.get("name", ""),
                    "namespace": meta.get("namespace", "default"), "uid": meta.get("uid", "")}
        message = status.redacted(message, rs.secrets if rs else ())[:1000]
        await self._try(logger, f"post Event {reason}", self.api.post_event(involved, etype, reason, message,
                                                                              COMPONENT))
