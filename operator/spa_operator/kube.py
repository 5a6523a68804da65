"""The Kubernetes executor: kopf handlers that carry out the planner's decisions as batch/v1 Jobs.

No pipeline logic lives here: what runs next comes from `plan_next_stage`, what a Job looks like from `jobs.build_job`.
This module only turns cluster state into the planner's `StageResult`s and its answers into API calls.

Flow (one reconciler per run, a kopf daemon, so a run is never reconciled twice at once):
- the daemon starts on create/resume, reconciles, then sleeps until woken or a slow timer fires;
- a Job watch (`@kopf.on.event` + a kopf index of Jobs by run) wakes the run's daemon on every Job change, so the next
  Job exists within milliseconds of the previous one finishing;
- a new spec generation wakes it too (`@kopf.on.event` on runs); a change other than `suspend` after the start
  (which the CRD already forbids) fails the run with SpecImmutable;
- a stage is done only once its manifest is in storage; storage errors become the StorageReachable condition.
Status is written by the daemon alone, from an in-memory copy, as a merge patch of the fields that changed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from spa_workers import contract
from spa_workers.contract import ManifestKeys as K
from spa_workers.storage import StorageError

from spa_operator import crd, jobs
from spa_operator.planner import (
    Action,
    PlannedStage,
    StageResult,
    StageState,
    plan_next_stage,
    stage_graph,
)
from spa_operator.runstore import ClientCache, RunStore
from spa_operator.spec import AlignmentRun, SpecError, parse_run

RUNS = (crd.GROUP, crd.VERSION, crd.PLURAL)
JOB_FILTER = {"labels": {jobs.LABEL_RUN: kopf.PRESENT}}
FINALIZER = "spa.dev/finalizer"
MERGE_PATCH = "application/merge-patch+json"
log = logging.getLogger("spa_operator")

# evaluate's win-rate figures: manifest key -> (gauge name, help)
WIN_RATE_GAUGES = {
    K.WIN_RATE: ("spa_iteration_win_rate", "Win rate against the reference, percent"),
    K.WIN_RATE_SE: ("spa_iteration_win_rate_stderr", "Standard error of the win rate, percent"),
    K.LC_WIN_RATE: ("spa_iteration_lc_win_rate", "Length-controlled win rate against the reference, percent"),
    K.LC_WIN_RATE_SE: ("spa_iteration_lc_win_rate_stderr", "Standard error of the LC win rate, percent"),
    K.JUDGE_FAILED: ("spa_iteration_judge_failed", "Judgments given up after retries"),
}
PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
STAGE_METRICS = (K.PAIRS, K.DROPPED_IDENTICAL, K.DROPPED_EMPTY, K.RESPONSES, K.REWARD_GAP, K.CONFIDENCE, K.LOSS,
                 K.REWARD_ACCURACY, K.REFINED_FRACTION, K.HELDOUT_AGREEMENT, K.TOKENS_PER_S, "wall_s",
                 *WIN_RATE_GAUGES)


@dataclasses.dataclass
class Config:
    namespaces: list[str] = dataclasses.field(default_factory=list)  # empty: cluster-wide
    server: str | None = None  # API server URL without auth (tests); None: in-cluster or kubeconfig
    timer_s: float = 60.0  # safety net: reconcile each run at least this often
    progress_s: float = 15.0  # how often the running stage's heartbeat is read into status.progress
    retry_s: float = 10.0  # after a storage or API error
    worker_image: str = jobs.DEFAULT_WORKER_IMAGE
    worker_service_account: str | None = None  # for runs whose spec names none (the Helm chart's worker account)
    worker_metrics_port: int | None = None  # workers serve live metrics on this port; None: off
    # spec.storage for runs that name none (the Helm chart's `storage` values): uri, endpoint, region, secretRef.
    default_storage: dict[str, Any] | None = None
    metrics_port: int | None = 8080  # serves /metrics and /healthz; None: off
    metrics_host: str = "0.0.0.0"
    scanning: bool = True  # kopf's namespace/CRD scanning (off against API emulators)
    # Tests and benchmarks may replace storage access; (run, secret values) -> RunStore.
    store_factory: Callable[[AlignmentRun, dict[str, str] | None], RunStore] | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Config:
        env = os.environ
        cfg = cls(timer_s=float(env.get("SPA_OPERATOR_TIMER_S", 60)),
                  progress_s=float(env.get("SPA_OPERATOR_PROGRESS_S", 15)),
                  retry_s=float(env.get("SPA_OPERATOR_RETRY_S", 10)),
                  worker_image=env.get("SPA_WORKER_IMAGE", jobs.DEFAULT_WORKER_IMAGE),
                  worker_service_account=env.get("SPA_WORKER_SERVICE_ACCOUNT") or None,
                  worker_metrics_port=int(env.get("SPA_WORKER_METRICS_PORT") or 0) or None,
                  default_storage=default_storage_from_env(env))
        return dataclasses.replace(cfg, **overrides)


def default_storage_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """spec.storage for runs without one, from SPA_DEFAULT_STORAGE_{URI,ENDPOINT,REGION,SECRET}; None if no URI."""
    uri = env.get("SPA_DEFAULT_STORAGE_URI")
    if not uri:
        return None
    out: dict[str, Any] = {"uri": uri}
    if env.get("SPA_DEFAULT_STORAGE_ENDPOINT"):
        out["endpoint"] = env["SPA_DEFAULT_STORAGE_ENDPOINT"]
    if env.get("SPA_DEFAULT_STORAGE_REGION"):
        out["region"] = env["SPA_DEFAULT_STORAGE_REGION"]
    if env.get("SPA_DEFAULT_STORAGE_SECRET"):
        out["secretRef"] = {"name": env["SPA_DEFAULT_STORAGE_SECRET"]}
    return out


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class JobView:
    """What the operator needs from one Job (kept in a kopf index, keyed by run uid)."""

    name: str
    stage_key: str
    attempt: int
    state: str  # active | suspended | succeeded | failed
    permanent: bool = False
    reason: str = ""
    finished_at: float = 0.0  # monotonic time the operator first saw it finished (for the latency metric)


def job_view(body: Any) -> JobView:
    meta, status, spec = body.get("metadata", {}), body.get("status") or {}, body.get("spec") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    permanent, reason = False, ""
    if "Complete" in conds:
        state = "succeeded"
    elif "Failed" in conds:
        state = "failed"
        cond = conds["Failed"]
        permanent = cond.get("reason") == "PodFailurePolicy"  # the FailJob rule: exit code 2, bad input
        reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
    elif spec.get("suspend"):
        state = "suspended"
    else:
        state = "active"
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    try:
        attempt = int(labels.get(jobs.LABEL_ATTEMPT, "0"))
    except ValueError:
        attempt = 0
    return JobView(meta.get("name", ""), annotations.get(jobs.ANNOTATION_STAGE_KEY, ""), attempt, state, permanent,
                   reason[:500], time.monotonic() if state in ("succeeded", "failed") else 0.0)


# ------------------------------------------------------------------------------------------------------------ API


class ApiError(Exception):
    """An API request answered with an error status (its body is not kept: it could echo what was sent)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class KubeApi:
    """The few API calls the operator makes itself (kopf does the watching), with aiohttp on the operator's loop.

    Credentials come from a kubernetes-client Configuration (in-cluster or kubeconfig; its token refresh hook runs on
    each call). The kubernetes client itself is not used for requests: run in threads it cost ~4x the CPU per call,
    and the threads' GIL hand-offs delayed the event loop that reacts to Job events."""

    def __init__(self, conf: Any) -> None:
        self.conf = conf
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
        headers = {"Accept": "application/json", "User-Agent": "spa-operator"}
        for auth in self.conf.auth_settings().values():  # refreshes an expiring token first
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if self.conf.username or self.conf.password:
            headers["Authorization"] = self.conf.get_basic_auth_token()
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(self, verb: str, method: str, path: str, body: Any = None,
                       content_type: str = "application/json") -> Any:
        import aiohttp

        if self.requests is not None:
            self.requests.labels(verb).inc()
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:  # one session per loop (tests restart operators)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl(), limit=32),
                                                  timeout=aiohttp.ClientTimeout(total=60))
            self._loop = loop
        data = None if body is None else json.dumps(body)
        async with self._session.request(method, self.conf.host.rstrip("/") + path, data=data,
                                         headers=self._headers(content_type if data else None)) as r:
            payload = await r.read()
            if r.status >= 400:
                raise ApiError(r.status, r.reason or "")
            return json.loads(payload) if payload else None

    async def close(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

    async def create_job(self, body: dict[str, Any]) -> str:
        """'created', 'exists' (409: a previous operator made it), or raises ApiError."""
        try:
            await self._request("create", "POST", f"/apis/batch/v1/namespaces/{body['metadata']['namespace']}/jobs",
                                body)
            return "created"
        except ApiError as e:
            if e.status == 409:
                return "exists"
            raise

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._request("patch", "PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", patch,
                            MERGE_PATCH)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._request("patch", "PATCH", f"/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{namespace}/{crd.PLURAL}/"
                                              f"{name}/status", {"status": status}, MERGE_PATCH)

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = await self._request("get", "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


def api_error(e: Exception) -> str:
    """A one-line API error without response bodies (which could echo what was sent)."""
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None) or type(e).__name__
    return f"API error {status}: {reason}" if status else f"API error: {reason}"


# -------------------------------------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        run = ["namespace", "run"]
        self.phase = Gauge("spa_run_phase", "1 for the run's current phase", [*run, "phase"], registry=r)
        self.iteration = Gauge("spa_run_iteration", "Iteration of the run's current stage", run, registry=r)
        self.progress = Gauge("spa_run_stage_progress", "Fraction done of the current stage", run, registry=r)
        # One series per running stage (value: its start, Unix seconds): which stage a run is in, and for how long.
        self.stage_started = Gauge("spa_run_stage_started_timestamp_seconds", "Start time of each running stage",
                                   [*run, "iteration", "stage"], registry=r)
        self._stage_labels: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._exported: dict[tuple[str, str], tuple[Any, ...]] = {}  # run -> what export_run last set
        self.stage_seconds = Histogram("spa_stage_duration_seconds", "Stage wall time (first Job to manifest)",
                                       ["stage"], registry=r,
                                       buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400))
        self.job_outcomes = Counter("spa_job_outcomes_total", "Finished stage Jobs by outcome",
                                    ["stage", "outcome"], registry=r)
        self.transition = Histogram("spa_transition_seconds", "Job seen finished -> next Job created", registry=r,
                                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.storage_errors = Counter("spa_storage_errors_total", "Storage reads that failed", registry=r)
        self.api_requests = Counter("spa_operator_api_requests_total", "API requests made by the reconciler",
                                    ["verb"], registry=r)
        it = [*run, "iteration"]
        self.quality = {
            K.PAIRS: Gauge("spa_iteration_pairs_judged", "Pairs the judge kept", it, registry=r),
            K.REWARD_GAP: Gauge("spa_iteration_reward_gap", "Mean chosen-rejected implicit reward gap", it,
                                registry=r),
            K.REFINED_FRACTION: Gauge("spa_iteration_refined_fraction", "Fraction of samples self-refined", it,
                                      registry=r),
            K.LOSS: Gauge("spa_iteration_dpo_loss", "Final DPO loss", it, registry=r),
            K.REWARD_ACCURACY: Gauge("spa_iteration_reward_accuracy", "Training reward accuracy", it, registry=r),
            K.HELDOUT_AGREEMENT: Gauge("spa_iteration_heldout_agreement", "Held-out gold agreement", it,
                                       registry=r),
            **{k: Gauge(name, doc, it, registry=r) for k, (name, doc) in WIN_RATE_GAUGES.items()},
        }

    def export_run(self, ns: str, name: str, phase: str, iteration: int | None, progress: float | None,
                   running: dict[tuple[str, str], float]) -> None:
        """A run's gauges; skipped when nothing changed since the last export (most reconciles change nothing)."""
        key = (phase, iteration, progress, tuple(sorted(running.items())))
        if self._exported.get((ns, name)) == key:
            return
        self._exported[(ns, name)] = key
        self.set_phase(ns, name, phase)
        if iteration is not None:
            self.iteration.labels(ns, name).set(iteration)
        if progress is not None:
            self.progress.labels(ns, name).set(progress)
        self.set_running_stages(ns, name, running)

    def set_phase(self, ns: str, name: str, phase: str) -> None:
        for p in (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED):
            self.phase.labels(ns, name, p).set(1 if p == phase else 0)

    def set_running_stages(self, ns: str, name: str, stages: dict[tuple[str, str], float]) -> None:
        """stages: (iteration, stage) -> start time of every running stage of the run."""
        old = self._stage_labels.get((ns, name), set())
        for gone in old - set(stages):
            _remove(self.stage_started, ns, name, *gone)
        for (iteration, stage), started in stages.items():
            self.stage_started.labels(ns, name, iteration, stage).set(started)
        self._stage_labels[(ns, name)] = set(stages)

    def forget(self, ns: str, name: str) -> None:
        self._exported.pop((ns, name), None)
        for g in (self.iteration, self.progress):
            _remove(g, ns, name)
        self.set_running_stages(ns, name, {})
        self._stage_labels.pop((ns, name), None)
        for p in (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED):
            _remove(self.phase, ns, name, p)
        for g in self.quality.values():
            for labels in [s.labels for m in g.collect() for s in m.samples]:
                if labels.get("namespace") == ns and labels.get("run") == name:
                    _remove(g, ns, name, labels["iteration"])


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


# ----------------------------------------------------------------------------------------------------- controller


@dataclasses.dataclass
class RunState:
    """The operator's memory of one run (rebuilt from the resource after a restart)."""

    uid: str
    waker: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    status: dict[str, Any] | None = None  # last status written (or read at start)
    last_progress: float = 0.0
    secrets: tuple[str, ...] = ()  # values to redact from anything written
    spec_violation: str | None = None  # a field changed after the start
    finished: list[str] = dataclasses.field(default_factory=list)  # stages confirmed done, not yet announced
    seen_jobs: set[str] = dataclasses.field(default_factory=set)  # Jobs seen in a watch event or the index
    first_pass: bool = True  # the first reconcile after (re)start: the Job index is complete by then
    generation: int | None = None  # metadata.generation last reconciled
    started_spec: dict[str, Any] | None = None  # the spec once the run started: only suspend may change
    # (generation, its run, storage root, stage graph): parsed once per generation
    parsed: tuple[int | None, AlignmentRun, str, list[PlannedStage]] | None = None


class Controller:
    def __init__(self, cfg: Config, api: KubeApi) -> None:
        self.cfg = cfg
        self.api = api
        self.metrics = Metrics()
        api.requests = self.metrics.api_requests
        self.runs: dict[str, RunState] = {}
        self.secrets: dict[tuple[str, str], tuple[float, dict[str, str] | None]] = {}
        self.clients = ClientCache()
        self.started = time.monotonic()
        self.healthy = False

    # -- wiring ---------------------------------------------------------------------------------------------------

    def job_event(self, uid: str, job: str) -> None:
        """A Job of run `uid` changed: remember it was seen and wake the run's reconciler.

        Seen here, not in the reconciler: a Job created and deleted between two reconciles would otherwise never be
        known to have existed, and its stage would wait for it forever."""
        rs = self.runs.get(uid)
        if rs is not None:
            rs.seen_jobs.add(job)
            rs.waker.set()

    def store_for(self, run: AlignmentRun, secret: dict[str, str] | None) -> RunStore:
        if self.cfg.store_factory is not None:
            return self.cfg.store_factory(run, secret)
        st = run.spec.storage
        return self.clients.store(st.endpoint if st else None, st.region if st else None, secret)

    async def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        """The run's credentials, re-read at most every timer_s (rotation is picked up; no read per event)."""
        cached = self.secrets.get((ns, name))
        if cached is not None and time.monotonic() - cached[0] < self.cfg.timer_s:
            return cached[1]
        value = await self.api.read_secret(ns, name)
        if value is not None:  # a missing Secret is looked up again on the next pass
            self.secrets[(ns, name)] = (time.monotonic(), value)
        return value

    # -- the reconciler ---------------------------------------------------------------------------------------------

    async def reconcile(self, rs: RunState, body: Any, index: Any, logger: logging.Logger | logging.LoggerAdapter
                        ) -> float | None:
        """Bring the run one step forward; returns seconds until the next unprompted look (None: only when woken)."""
        meta = body.get("metadata", {})
        ns, name = meta.get("namespace", "default"), meta.get("name", "")
        if meta.get("deletionTimestamp"):
            return None
        if rs.status is None:
            rs.status = _plain(body.get("status") or {})
        old = rs.status
        new = _plain(old)
        generation = meta.get("generation")
        phase = old.get("phase")
        failed_cond = _cond(old, "Failed")
        terminal = phase == SUCCEEDED or (phase == FAILED and (failed_cond or {}).get("reason") != "InvalidSpec")
        if terminal:
            if generation is not None and old.get("observedGeneration") != generation:
                new["observedGeneration"] = generation
                await self._write(rs, body, new, logger)
            return None
        rs.generation = generation
        spec_now = _plain(body.get("spec") or {})
        if old.get("stages"):
            if rs.started_spec is None:
                rs.started_spec = spec_now
            field = first_difference(rs.started_spec, spec_now, "spec", ignore={"spec.suspend"})
            if field:
                rs.spec_violation = f"{field}: immutable once the run has started (only spec.suspend may change)"
        if rs.spec_violation:
            return await self._fail(rs, body, new, "SpecImmutable", rs.spec_violation, logger)

        # 1. The spec, validated as the CRD would (the operator never crash-loops on a bad one). Parsed once per
        # generation (the spec changes only with it): parsing on every event was a tenth of the operator's work.
        if rs.parsed is None or generation is None or rs.parsed[0] != generation:
            try:
                run = validate_for_cluster(body, self.cfg.default_storage)
            except SpecError as e:
                if phase == FAILED and old.get("observedGeneration") == generation:
                    return None
                return await self._fail(rs, body, new, "InvalidSpec", f"{e.field}: {e.message}", logger)
            assert run.spec.storage is not None
            root = run_root(run.spec.storage.uri, ns, name, rs.uid)
            rs.parsed = (generation, run, root, stage_graph(run.spec, root))
        _, run, root, graph = rs.parsed
        spec = run.spec
        new["storagePrefix"] = root
        new["observedGeneration"] = generation
        by_key = {s.key: s for s in graph}

        # 2. Credentials for reading manifests (the Jobs get them from the same Secret by reference).
        secret: dict[str, str] | None = None
        secret_problem = None
        if spec.storage.secret_ref:
            try:
                secret = await self._secret(ns, spec.storage.secret_ref.name)
            except Exception as e:  # API trouble: try again later
                secret_problem = api_error(e)
            else:
                if secret is None:
                    secret_problem = f"Secret {spec.storage.secret_ref.name} not found"
                else:
                    rs.secrets = tuple(v for v in secret.values() if len(v) >= 4)
        store = self.store_for(run, secret)

        # 3. What each stage's Jobs and records say, checked against storage.
        job_views: dict[str, list[JobView]] = {}
        for view in index.get(rs.uid, []) if index is not None else []:
            job_views.setdefault(view.stage_key, []).append(view)
            rs.seen_jobs.add(view.name)
        records = {r["name"]: dict(r) for r in new.get("stages", []) if r.get("name") in by_key}
        results: dict[str, StageResult] = {}
        storage_problem = None
        finished_seen: list[float] = []
        for stage in graph:
            views = sorted(job_views.get(stage.key, []), key=lambda v: v.attempt)
            try:
                res, rec = await self._stage_result(stage, records.get(stage.key), views, store, ns, name, body)
            except StorageError as e:
                storage_problem = str(e)
                self.metrics.storage_errors.inc()
                res, rec = StageResult(StageState.RUNNING), records.get(stage.key)
            if res is not None:
                results[stage.key] = res
            if rec is not None:
                records[stage.key] = rec
            if views and views[-1].finished_at:
                finished_seen.append(views[-1].finished_at)

        # 4. The plan, carried out.
        plan = plan_next_stage(spec, root, results)
        message = ""
        if plan.action is Action.START and spec.suspend:
            plan = dataclasses.replace(plan, action=Action.WAIT, start=())
        if plan.action is Action.START:
            if storage_problem or secret_problem:
                message = "waiting: " + (storage_problem or secret_problem or "")
            else:
                last_finish = max(finished_seen, default=0.0)
                for todo in plan.start:
                    started = await self._start(rs, todo.stage, spec, run, new, records, ns, name, body, logger)
                    if started and last_finish:
                        self.metrics.transition.observe(max(time.monotonic() - last_finish, 0.0))
                running = [k for k, r in records.items() if r.get("state") == RUNNING]
                message = f"running {', '.join(running)}" if running else ""
                # A Job the API refused (422) fails its stage for good: plan again to fail the run now.
                refused = {k: StageResult(StageState.FAILED, failures=r.get("failures", 1), permanent=True,
                                          reason=r.get("reason", "")) for k, r in records.items()
                           if r.get("state") == FAILED and r.get("reason", "").startswith("Job rejected")}
                if refused:
                    plan = plan_next_stage(spec, root, {**results, **refused})
        if plan.action is Action.DONE:
            new["phase"] = SUCCEEDED
            new["outputs"] = {"model": plan.final_model}
            new["progress"] = 1.0
            new.setdefault("completionTime", now_iso())
            # a run the quality gate stopped says so, and which iteration's model it publishes
            message = f"{plan.reason}; final model: {plan.final_model}" if plan.reason else \
                f"final model: {plan.final_model}"
            if phase != SUCCEEDED:
                self._event(body, "Normal", "RunSucceeded", message, rs)
            rs.finished.clear()
        elif plan.action is Action.FAILED:
            return await self._fail(rs, body, new, "StageFailed", plan.reason, logger, stage_key=plan.failed_stage)
        elif spec.suspend:
            new["phase"] = SUSPENDED
            message = "suspended"
            if not spec.queue_name:  # with Kueue, Kueue owns the Jobs' suspend field: only new stages wait
                await self._suspend_jobs(job_views, True, ns, logger)
            if phase != SUSPENDED:
                self._event(body, "Normal", "Suspended", "no new stage starts; running Jobs are suspended", rs)
        else:
            if phase == SUSPENDED:
                if not spec.queue_name:
                    await self._suspend_jobs(job_views, False, ns, logger)
                self._event(body, "Normal", "Resumed", "the run goes on", rs)
            new["phase"] = RUNNING if records else PENDING
            if plan.action is Action.WAIT and not message:
                running = [k for k, r in records.items() if r.get("state") == RUNNING]
                message = f"running {', '.join(running)}" if running else plan.reason

        new["stages"] = [records[s.key] for s in graph if s.key in records]
        if rs.finished and plan.action is Action.WAIT:  # nothing started this time: say what finished now
            self._event(body, "Normal", "StageSucceeded", f"{', '.join(rs.finished)} succeeded", rs)
            rs.finished.clear()

        # 5. Where the run stands: current stage, progress, conditions.
        current = _current(graph, records)
        if current is not None and new["phase"] not in (SUCCEEDED,):
            stage = by_key[current]
            if new.get("stage") != stage.stage or new.get("iteration") != stage.iteration:
                new["progress"] = 0.0
                rs.last_progress = 0.0
            new["iteration"], new["stage"] = stage.iteration, stage.stage
            if not storage_problem and time.monotonic() - rs.last_progress >= self.cfg.progress_s:
                rs.last_progress = time.monotonic()
                try:
                    frac = await asyncio.to_thread(store.progress, stage.args)
                except StorageError as e:
                    storage_problem = str(e)
                    self.metrics.storage_errors.inc()
                else:
                    if frac is not None:
                        new["progress"] = round(frac, 3)
        elif new["phase"] == SUCCEEDED:
            last = graph[-1] if graph else None
            if last is not None:
                new["iteration"], new["stage"] = last.iteration, last.stage
        new["message"] = self._redact(rs, message)
        self._conditions(rs, new, storage_problem, secret_problem, spec.suspend)
        if (storage_problem is None) != (_cond(old, "StorageReachable") or {}).get("status", "True").startswith("T"):
            if storage_problem:
                self._event(body, "Warning", "StorageUnreachable", storage_problem, rs)
            else:
                self._event(body, "Normal", "StorageReachable", "storage answers again", rs)
        if new.get("phase") in (RUNNING, SUSPENDED) and "startTime" not in new and records:
            new["startTime"] = now_iso()
        await self._write(rs, body, new, logger)
        rs.first_pass = False
        self._export(ns, name, new)
        if storage_problem or secret_problem:
            return self.cfg.retry_s
        if new["phase"] == SUCCEEDED:
            return None
        if any(r.get("state") == RUNNING for r in records.values()):
            return min(self.cfg.timer_s, self.cfg.progress_s)
        return self.cfg.timer_s

    async def _stage_result(self, stage: PlannedStage, rec: dict[str, Any] | None, views: list[JobView],
                            store: RunStore, ns: str, name: str, body: Any
                            ) -> tuple[StageResult | None, dict[str, Any] | None]:
        """The planner's view of one stage, from its record, its Jobs and (for a finished Job) storage;
        returns it with the stage's updated status record."""
        if rec is not None and rec.get("state") == SUCCEEDED:
            return StageResult(StageState.SUCCEEDED, metrics=rec.get("metrics") or {}), rec
        latest = views[-1] if views else None
        rec_attempts = rec.get("attempts", 0) if rec else 0
        failed_jobs = sum(1 for v in views if v.state == "failed")
        failures = max(rec.get("failures", 0) if rec else 0, failed_jobs)
        if latest is None or latest.attempt < rec_attempts:
            if rec is None:
                return None, None
            if rec.get("state") == RUNNING:
                rs = self.runs.get(_uid(body))
                job = rec.get("job", "")
                # Indexed before (or missing from the index kopf filled before the first pass): it was deleted.
                vanished = rs is not None and (job in rs.seen_jobs or rs.first_pass)
                if not vanished:
                    return StageResult(StageState.RUNNING), rec  # just created: its watch event is on the way
                if await asyncio.to_thread(store.manifests, stage.args):  # finished, then removed (TTL)
                    rec.update(state=SUCCEEDED, endTime=now_iso(), outputs=_outputs(stage))
                    return StageResult(StageState.SUCCEEDED, metrics=rec.get("metrics") or {}), rec
                return self._record_failure(stage, rec, failures + 1, f"Job {job} was deleted", False, body), rec
            return StageResult(StageState.FAILED, failures=failures, reason=rec.get("reason", "")), rec
        rec = rec if rec is not None else self._new_record(stage, latest.name, latest.attempt)
        rec["job"], rec["attempts"] = latest.name, max(rec_attempts, latest.attempt)
        if latest.state in ("active", "suspended"):
            rec["state"] = RUNNING
            rec["failures"] = failures
            return StageResult(StageState.RUNNING), rec
        if latest.state == "succeeded":
            manifests = await asyncio.to_thread(store.manifests, stage.args)  # may raise StorageError
            if manifests:
                rec.update(state=SUCCEEDED, endTime=now_iso(), failures=failures,
                           outputs=_outputs(stage), metrics=_compact_metrics(manifests))
                rec.pop("reason", None)
                self.metrics.job_outcomes.labels(stage.stage, "succeeded").inc()
                self._observe_quality(ns, name, stage, manifests)
                started = _parse_time(rec.get("startTime"))
                if started:
                    self.metrics.stage_seconds.labels(stage.stage).observe(max(time.time() - started, 0.0))
                rs = self.runs.get(_uid(body))
                if rs is not None:  # announced with the next transition's Event (one Event per transition)
                    rs.finished.append(stage.key)
                return StageResult(StageState.SUCCEEDED, metrics=rec.get("metrics") or {}), rec
            failures = max(failures, failed_jobs + 1)
            reason = f"Job {latest.name} succeeded but {stage.key} wrote no manifest"
            return self._record_failure(stage, rec, failures, reason, False, body), rec
        return self._record_failure(stage, rec, failures, latest.reason or "Job failed", latest.permanent, body), rec

    def _record_failure(self, stage: PlannedStage, rec: dict[str, Any], failures: int, reason: str, permanent: bool,
                        body: Any) -> StageResult:
        rs = self.runs.get(_uid(body))
        first_time = rec.get("state") != FAILED or rec.get("failures", 0) < failures
        rec.update(state=FAILED, failures=failures, reason=self._redact(rs, reason))
        if first_time:
            self.metrics.job_outcomes.labels(stage.stage, "bad-input" if permanent else "failed").inc()
            self._event(body, "Warning", "StageFailed", f"{stage.key} attempt {rec.get('attempts')}: {reason}", rs)
        return StageResult(StageState.FAILED, failures=failures, permanent=permanent, reason=reason)

    @staticmethod
    def _new_record(stage: PlannedStage, job: str, attempt: int) -> dict[str, Any]:
        return {"name": stage.key, "iteration": stage.iteration, "stage": stage.stage, "state": RUNNING,
                "job": job, "attempts": attempt, "failures": 0, "startTime": now_iso()}

    async def _start(self, rs: RunState, stage: PlannedStage, spec: Any, run: AlignmentRun, new: dict[str, Any],
                     records: dict[str, dict[str, Any]], ns: str, name: str, body: Any, logger: Any) -> bool:
        rec = records.get(stage.key)
        attempt = (rec.get("attempts", 0) if rec else 0) + 1
        ref = jobs.RunRef(name=name, namespace=ns, uid=rs.uid, api_version=body.get("apiVersion", "spa.dev/v1alpha1"),
                          kind=body.get("kind", crd.KIND))
        manifest = jobs.build_job(stage, attempt, ref, spec, self.cfg.worker_image,
                                  self.cfg.worker_service_account, self.cfg.worker_metrics_port)
        job = manifest["metadata"]["name"]
        try:
            outcome = await self.api.create_job(manifest)
        except Exception as e:
            status = getattr(e, "status", None)
            if status is not None and 400 <= status < 500 and status not in (401, 403, 429):
                # The API refused this Job (e.g. an invalid name or quantity): retrying cannot help.
                reason = f"Job rejected by the API server: {api_error(e)}"
                rec = rec or self._new_record(stage, job, attempt)
                rec.update(attempts=attempt, job=job, state=FAILED, failures=rec.get("failures", 0) + 1,
                           reason=f"Job rejected: {api_error(e)}")
                records[stage.key] = rec
                self._event(body, "Warning", "StageFailed", f"{stage.key}: {reason}", rs)
                return False
            logger.warning(f"creating Job {job} failed: {api_error(e)}; will retry")
            return False
        if rec is None:
            rec = self._new_record(stage, job, attempt)
        rec.update(state=RUNNING, job=job, attempts=attempt)
        rec.pop("reason", None)
        rec.pop("endTime", None)
        records[stage.key] = rec
        if outcome == "created":
            after = f" (after {', '.join(rs.finished)} succeeded)" if rs.finished else ""
            rs.finished.clear()
            self._event(body, "Normal", "StageStarted", f"{stage.key} attempt {attempt}: Job {job}{after}", rs)
        return outcome == "created"

    async def _suspend_jobs(self, job_views: dict[str, list[JobView]], suspend: bool, ns: str, logger: Any) -> None:
        want = "active" if suspend else "suspended"
        for views in job_views.values():
            for v in views:
                if v.state == want:
                    try:
                        await self.api.patch_job(ns, v.name, {"spec": {"suspend": suspend}})
                    except Exception as e:
                        logger.warning(f"could not {'suspend' if suspend else 'resume'} Job {v.name}: {api_error(e)}")

    async def _fail(self, rs: RunState, body: Any, new: dict[str, Any], reason: str, message: str, logger: Any,
                    stage_key: str | None = None) -> float | None:
        message = self._redact(rs, message)
        was_failed = (rs.status or {}).get("phase") == FAILED
        new["phase"] = FAILED
        new["message"] = message
        new.setdefault("completionTime", now_iso())
        new["observedGeneration"] = body.get("metadata", {}).get("generation")
        self._conditions(rs, new, None, None, False, failed=(reason, message))
        await self._write(rs, body, new, logger)
        meta = body.get("metadata", {})
        self._export(meta.get("namespace", ""), meta.get("name", ""), new)
        if not was_failed or _cond(rs.status or {}, "Failed") is None:
            self._event(body, "Warning", reason, message, rs)
        logger.warning(f"run failed: {reason}: {message}")
        return None

    def _conditions(self, rs: RunState, new: dict[str, Any], storage_problem: str | None,
                    secret_problem: str | None, suspended: bool, failed: tuple[str, str] | None = None) -> None:
        phase = new.get("phase", PENDING)
        conds = {c["type"]: c for c in new.get("conditions", [])}
        gen = new.get("observedGeneration")

        def put(ctype: str, ok: bool, reason: str, message: str = "") -> None:
            prev = conds.get(ctype)
            status = "True" if ok else "False"
            cond = {"type": ctype, "status": status, "reason": reason, "message": self._redact(rs, message)}
            if gen is not None:
                cond["observedGeneration"] = gen
            cond["lastTransitionTime"] = (prev["lastTransitionTime"] if prev and prev.get("status") == status
                                          and prev.get("lastTransitionTime") else now_iso())
            conds[ctype] = cond

        if failed:
            put("Failed", True, failed[0], failed[1])
            put("Ready", False, "Failed", failed[1])
            put("Progressing", False, "Failed", "")
        else:
            put("Failed", False, "NotFailed", "")
            # Succeeded: "final model: <uri>", after the quality gate's reason when it stopped the run
            put("Ready", phase == SUCCEEDED, "Succeeded" if phase == SUCCEEDED else phase,
                new.get("message", "") if phase == SUCCEEDED else "")
            blocked = storage_problem or secret_problem
            progressing = phase in (RUNNING, PENDING) and not blocked
            reason = ("StorageUnreachable" if storage_problem else "SecretUnavailable" if secret_problem
                      else "StagesRunning" if phase == RUNNING else phase)
            put("Progressing", progressing, reason, blocked or new.get("message", ""))
            put("StorageReachable", storage_problem is None,
                "StorageUnreachable" if storage_problem else "Reachable", storage_problem or "")
        put("Suspended", suspended and not failed, "Suspended" if suspended else "NotSuspended", "")
        order = ["Ready", "Progressing", "Failed", "Suspended", "StorageReachable"]
        new["conditions"] = [conds[t] for t in order if t in conds]

    async def _write(self, rs: RunState, body: Any, new: dict[str, Any], logger: Any) -> None:
        old = rs.status or {}
        patch = _merge_patch(old, new)
        if not patch:
            return
        meta = body.get("metadata", {})
        try:
            await self.api.patch_status(meta.get("namespace", "default"), meta.get("name", ""), patch)
        except Exception as e:
            logger.warning(f"status update failed: {api_error(e)}; will retry")
            raise _RetrySoon from None
        rs.status = new

    def _event(self, body: Any, etype: str, reason: str, message: str, rs: RunState | None) -> None:
        with contextlib.suppress(LookupError):  # outside an operator context (unit use)
            kopf.event(body, type=etype, reason=reason, message=self._redact(rs, message)[:1000])

    @staticmethod
    def _redact(rs: RunState | None, text: str) -> str:
        for secret in rs.secrets if rs else ():
            text = text.replace(secret, "***")
        return text

    def _observe_quality(self, ns: str, name: str, stage: PlannedStage, manifests: list[Any]) -> None:
        metrics: dict[str, float] = {}
        for m in manifests:
            for k, v in {**m.counts, **m.metrics}.items():
                if isinstance(v, int | float):
                    metrics[k] = metrics.get(k, 0.0) + v if k == K.PAIRS else v
        for key, gauge in self.metrics.quality.items():
            if key in metrics and not (key == K.PAIRS and stage.stage == contract.SEED_TRAIN):
                gauge.labels(ns, name, str(stage.iteration)).set(metrics[key])

    def _export(self, ns: str, name: str, status: dict[str, Any]) -> None:
        running: dict[tuple[str, str], float] = {}
        if status.get("phase") in (RUNNING, SUSPENDED):
            for rec in status.get("stages") or []:
                started = _parse_time(rec.get("startTime"))
                if rec.get("state") == RUNNING and started:
                    running[(str(rec.get("iteration", "")), str(rec.get("stage", "")))] = started
        self.metrics.export_run(ns, name, status.get("phase", PENDING), status.get("iteration"),
                                status.get("progress"), running)


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, built only where it is used. kopf builds it for every watch event by deep-copying the whole
    object, which was the largest cost per event: a run's status holds every stage record, a Job's spec its pod.

    Only runs have daemons (kopf resets a daemon's idle timer on a change of the diff base); the operator has no
    on.create/update handlers, and Jobs need no diff at all. A run's diff base is built without status."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if extra_fields:  # a handler watching a status field needs it kept
            return super().build(body=body, extra_fields=extra_fields)
        if body.get("kind") != crd.KIND:
            return kopf.BodyEssence()
        return super().build(body=kopf.Body({k: v for k, v in body.items() if k != "status"}))


class _RetrySoon(Exception):
    """A write failed: the daemon retries after cfg.retry_s."""


def _plain(obj: Any) -> Any:
    """A deep plain-dict copy (kopf bodies are views)."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _cond(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == ctype), None)


def _uid(body: Any) -> str:
    meta = body.get("metadata", {})
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


def _current(graph: list[PlannedStage], records: dict[str, dict[str, Any]]) -> str | None:
    """The run's current stage: the latest (in plan order) running one, else the latest started."""
    running = [s.key for s in graph if records.get(s.key, {}).get("state") == RUNNING]
    if running:
        return running[-1]
    started = [s.key for s in graph if s.key in records]
    return started[-1] if started else None


def _outputs(stage: PlannedStage) -> dict[str, str]:
    out = {"dir": stage.output}
    if stage.stage in (contract.TRAIN, contract.SEED_TRAIN):
        out["model"] = f"{stage.output.rstrip('/')}/{contract.MODEL_SUBDIR}"
    return out


def _compact_metrics(manifests: list[Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in manifests:
        merged = {**m.counts, **m.metrics, "wall_s": m.timings.get("wall_s", 0.0)}
        for k in STAGE_METRICS:
            v = merged.get(k)
            if isinstance(v, int | float):
                # Counts add up over shards; rates and means are kept from the last shard (compact, not exact).
                out[k] = out.get(k, 0) + v if k in (K.PAIRS, K.DROPPED_IDENTICAL, K.DROPPED_EMPTY, K.RESPONSES) \
                    else max(out.get(k, v), v) if k == "wall_s" else v
    return {k: round(float(v), 6) for k, v in out.items()}


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch from old to new at the top level of status (lists and nested dicts are replaced)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def run_root(storage_uri: str, namespace: str, name: str, uid: str) -> str:
    """Where a run's stages write: a uid prefix keeps a re-created run of the same name from reusing outputs."""
    return f"{storage_uri.rstrip('/')}/{namespace}/{name}/{uid.replace('-', '')[:8]}"


def validate_for_cluster(body: Any, default_storage: dict[str, Any] | None = None) -> AlignmentRun:
    """parse_run plus the cluster's rules (S3 only), with the operator's default storage for runs that name none.

    Raises SpecError.
    """
    doc = _plain(body)
    doc.pop("status", None)
    if default_storage and isinstance(doc.get("spec"), dict) and "storage" not in doc["spec"]:
        doc["spec"]["storage"] = dict(default_storage)
    run = parse_run(doc, strict=True)
    st = run.spec.storage
    if st is None:
        raise SpecError("spec.storage", "required: set it in the run, or give the operator a default storage "
                                        "(SPA_DEFAULT_STORAGE_URI; Helm value storage.uri)")
    if not st.uri.startswith("s3://"):
        raise SpecError("spec.storage.uri", "must be s3://bucket/prefix in a cluster")
    return run


def first_difference(old: Any, new: Any, path: str, ignore: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The manifest path of the first field that differs between two specs (None: equal)."""
    if path in ignore:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}", ignore)
            if found:
                return found
        return None
    return None if old == new else path


# -------------------------------------------------------------------------------------------------------- handlers


def _ctl(memo: Any) -> Controller:
    return memo["controller"] if isinstance(memo, dict) else memo.controller


@kopf.on.login()
def login(memo: Any, logger: Any, settings: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    cfg = _ctl(memo).cfg
    if cfg.server:
        return kopf.ConnectionInfo(server=cfg.server, insecure=True)
    return kopf.login_via_client(logger=logger, settings=settings, **kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    settings.scanning.disabled = not ctl.cfg.scanning
    # kopf's own handler logs stay logs; transitions are posted as Events explicitly.
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="spa.dev")
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix="spa.dev", key="last-handled-configuration")
    settings.posting.reporting_component = "spa-operator"
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    if ctl.cfg.metrics_port is not None:
        memo["http"] = await serve_http(ctl, ctl.cfg.metrics_host, ctl.cfg.metrics_port)
    ctl.healthy = True


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    ctl.healthy = False
    runner = memo.get("http") if hasattr(memo, "get") else None
    if runner is not None:
        await runner.cleanup()
    await ctl.api.close()


@kopf.index("batch", "v1", "jobs", **JOB_FILTER)
async def jobs_by_run(body: Any, labels: Any, **_: Any) -> dict[str, JobView]:
    return {labels.get(jobs.LABEL_RUN_UID, ""): job_view(body)}


# Async handlers: kopf runs sync ones in threads, and an asyncio.Event set from a thread does not wake the loop.
@kopf.on.event("batch", "v1", "jobs", **JOB_FILTER)
async def job_changed(name: str, labels: Any, memo: Any, **_: Any) -> None:
    _ctl(memo).job_event(labels.get(jobs.LABEL_RUN_UID, ""), name)


@kopf.on.event(*RUNS)
async def run_changed(body: Any, memo: Any, **_: Any) -> None:
    """Wake the run's reconciler when its spec changed (a new generation); its own status patches do not.

    An event handler rather than on.update: kopf then keeps no diff base (no annotation write per run, no essence
    computed per event); the reconciler compares specs itself."""
    ctl = _ctl(memo)
    rs = ctl.runs.get(_uid(body))
    if rs is not None and body.get("metadata", {}).get("generation") != rs.generation:
        rs.waker.set()


@kopf.daemon(*RUNS, cancellation_timeout=5.0)
async def run_daemon(body: Any, stopped: Any, memo: Any, logger: Any, jobs_by_run: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    uid = _uid(body)
    rs = ctl.runs.setdefault(uid, RunState(uid))
    meta = body.get("metadata", {})
    try:
        while not stopped:
            rs.waker.clear()
            t0 = time.monotonic()
            try:
                delay = await ctl.reconcile(rs, body, jobs_by_run, logger)
                log.debug(f"{meta.get('name')}: reconciled in {1000 * (time.monotonic() - t0):.1f} ms")
            except _RetrySoon:
                delay = ctl.cfg.retry_s
            except Exception as e:  # never crash-loop: log it, look again later
                logger.exception(f"reconcile failed: {type(e).__name__}")
                delay = ctl.cfg.retry_s
            wake = asyncio.ensure_future(rs.waker.wait())
            stop = asyncio.ensure_future(stopped.wait())
            try:
                await asyncio.wait({wake, stop}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wake.cancel()
                stop.cancel()
    finally:
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            ctl.runs.pop(uid, None)
            ctl.metrics.forget(meta.get("namespace", ""), meta.get("name", ""))


# ------------------------------------------------------------------------------------------------------ http, main


async def serve_http(ctl: Controller, host: str, port: int) -> Any:
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(ctl.metrics.registry), content_type="text/plain")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=200 if ctl.healthy else 503, text="ok" if ctl.healthy else "starting")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def make_controller(cfg: Config) -> Controller:
    import kubernetes

    if cfg.server:
        conf = kubernetes.client.Configuration(host=cfg.server)
    else:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()
        conf = kubernetes.client.Configuration.get_default_copy()
    return Controller(cfg, KubeApi(conf))


async def run_operator(cfg: Config, stop_flag: Any = None, ready_flag: Any = None,
                       controller: Controller | None = None) -> None:
    """Run the operator in the current event loop until stop_flag (an asyncio or threading Event) is set.

    kopf cancels every task of the loop when it stops: give it a loop of its own (tests run it in a thread).
    """
    ctl = controller or make_controller(cfg)
    await kopf.operator(clusterwide=not cfg.namespaces, namespaces=cfg.namespaces, standalone=True,
                        stop_flag=stop_flag, ready_flag=ready_flag, memo=kopf.Memo(controller=ctl))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spa-operator", description="Run the AlignmentRun operator (kopf).")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch this namespace (repeatable; default: all namespaces)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPA_METRICS_PORT", 8080)),
                   help="port for /metrics and /healthz (0: off)")
    p.add_argument("--worker-image", default=os.environ.get("SPA_WORKER_IMAGE", jobs.DEFAULT_WORKER_IMAGE))
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # kopf logs every handled Job event at INFO; transitions are Events and metrics
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    cfg = Config.from_env(namespaces=args.namespace, metrics_port=args.metrics_port or None,
                          worker_image=args.worker_image)
    asyncio.run(run_operator(cfg))
    return 0
