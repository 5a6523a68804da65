"""What the operator observes about a run, for the decision core (`reconcile.decide`): views of its Jobs, pods and
Kueue Workloads (from kopf's indexes and the API), its spec validated as the cluster does, its status as the API server
has it, the credentials Secret, the stage manifests and heartbeat in storage. `controller.Controller` gathers them
through the `Observer` methods below; nothing here writes anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from spa_workers.storage import StorageError

from spa_operator import jobs, reconcile
from spa_operator.core_types import JobView, Observed, PodView, Settings, WorkloadView
from spa_operator.kubeapi import KubeApi, api_error
from spa_operator.metrics import Metrics
from spa_operator.planner import PlannedStage, stage_graph
from spa_operator.runstore import ClientCache, RunStore
from spa_operator.spec import AlignmentRun, SpecError, parse_run
from spa_operator.timestamps import parse_iso

if TYPE_CHECKING:
    from spa_operator.config import Config

# On a Kueue Workload this operator deactivated for spec.suspend: the run's uid (only those are reactivated on resume;
# Kueue deactivates Workloads itself, past its requeue limit, and those stay as Kueue left them).
PAUSED_ANNOTATION = "spa.dev/paused-by-run"
EXPECT_S = 60.0  # how long a Job created here is expected before its watch shows it (RunState.expected)


def job_view(body: Any) -> JobView:
    meta, status, spec = body.get("metadata", {}), body.get("status") or {}, body.get("spec") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    permanent, reason, suspended_since = False, "", 0.0
    if "Complete" in conds:
        state = "succeeded"
    elif "Failed" in conds:
        state = "failed"
        cond = conds["Failed"]
        permanent = jobs.failed_by_bad_input(cond)  # the exit-code-2 FailJob rule, not a gang's disruption
        reason = f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".strip(": ")
    elif spec.get("suspend"):
        state = "suspended"
        suspended_since = parse_iso((conds.get("Suspended") or {}).get("lastTransitionTime")) or 0.0
    else:
        state = "active"
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    owner = next((o.get("uid", "") for o in meta.get("ownerReferences") or [] if o.get("controller")), "")
    gang = _int(spec.get("parallelism")) if ((spec.get("template") or {}).get("spec") or {}).get("subdomain") else 0
    return JobView(meta.get("name", ""), annotations.get(jobs.ANNOTATION_STAGE_KEY, ""),
                   _int(labels.get(jobs.LABEL_ATTEMPT)), state, permanent, reason[:500], owner,
                   parse_iso(meta.get("creationTimestamp")) or 0.0, bool(meta.get("deletionTimestamp")),
                   time.monotonic() if state in ("succeeded", "failed") else 0.0, suspended_since, gang)


def pod_view(body: Any) -> PodView:
    """A pod of a run's Job: whether it may still run, and why it does not run yet (image pull, scheduling,
    admission), from its container statuses and its PodScheduled condition."""
    meta, status = body.get("metadata", {}), body.get("status") or {}
    labels = meta.get("labels") or {}
    phase = status.get("phase") or "Pending"
    waiting = ""
    for cs in status.get("containerStatuses") or []:
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason", "")
        if reason and reason not in ("ContainerCreating", "PodInitializing"):
            waiting = reason
            break
    sched = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
    if not waiting and phase == "Pending" and sched.get("status") == "False":
        waiting = sched.get("reason") or "Unschedulable"
    stage_key = (meta.get("annotations") or {}).get(jobs.ANNOTATION_STAGE_KEY, "")
    # A pod with a deletionTimestamp is still live until its phase says it ended: on a node cut off from the API
    # server its containers run on (and write to storage) for as long as the node is away.
    return PodView(meta.get("name", ""), labels.get("job-name", ""), stage_key, _int(labels.get(jobs.LABEL_ATTEMPT)),
                   phase not in ("Succeeded", "Failed"), waiting, parse_iso(meta.get("creationTimestamp")) or 0.0,
                   sched.get("status") != "False", bool(meta.get("deletionTimestamp")))


def workload_view(body: Any, run_uid: str) -> WorkloadView:
    """A Kueue Workload: the Job that owns it, whether it is active, and whether this run paused it."""
    meta = body.get("metadata", {})
    job = next((o.get("name", "") for o in meta.get("ownerReferences") or []
                if o.get("kind") == "Job" and o.get("controller")), "")
    return WorkloadView(meta.get("name", ""), job, (body.get("spec") or {}).get("active") is not False,
                        (meta.get("annotations") or {}).get(PAUSED_ANNOTATION) == run_uid)


def _int(text: Any) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


@dataclasses.dataclass
class RunState:
    """What the operator keeps per run between reconciles: caches and watch history, never the run's status."""

    uid: str
    namespace: str = ""
    waker: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    secrets: tuple[str, ...] = ()  # values to redact from anything written
    spec_violation: str | None = None  # a field changed after the start
    seen_jobs: set[str] = dataclasses.field(default_factory=set)  # Jobs seen in a watch event or the index
    first_pass: bool = True  # the first reconcile after (re)start: the Job index is complete by then
    awaiting_finalizer: bool = False  # kopf's finalizer has not landed on a new run yet: its status waits for it
    generation: int | None = None  # metadata.generation last reconciled
    started_spec: dict[str, Any] | None = None  # the spec once the run started: only suspend may change
    # (generation, its run or the spec error, storage root, stage graph): parsed once per generation
    parsed: tuple[int | None, AlignmentRun | None, str, list[PlannedStage], str | None] | None = None
    last_progress: float = 0.0  # monotonic time of the last heartbeat read
    # The run's resourceVersion after this operator's last status patch, and the status written: until the body
    # reaches that version, the written status is the newest one.
    written: tuple[str, dict[str, Any]] | None = None
    basis: str | None = None  # the resourceVersion of the status the last decision started from (its precondition)
    status_copy: tuple[str, dict[str, Any]] | None = None  # (resourceVersion, the body's status as a plain dict)
    stale: str | None = None  # a status patch decided from this version was refused (409): wait for a newer one
    # The last 403 on create (why, condition reason), how many in a row, and when creating may be tried again.
    denied: tuple[str, str] | None = None
    denials: int = 0
    denied_until: float = 0.0
    # Each Job and pod as the last reconcile saw it (its `unstamped` view; Jobs it created, as the API server
    # returned them): a watch event that shows nothing new to the decision wakes no reconcile.
    observed: dict[tuple[str, str], JobView | PodView] = dataclasses.field(default_factory=dict)
    # Jobs this operator created that its Job watch has not shown yet (name -> (monotonic time, view as created)): a
    # decision made before the watch catches up (after a refused status patch, say) sees them instead of creating
    # them again, as client-go's ControllerExpectations do. Kept until the watch shows the Job or its deletion, or
    # EXPECT_S passed (then a create answers 409 and the Job is adopted, as without them).
    expected: dict[str, tuple[float, JobView]] = dataclasses.field(default_factory=dict)
    # (generation, its spec as a plain dict); the spec before any stage started; the generation whose spec was
    # last compared with the spec the run started with (the spec changes only with the generation).
    spec: tuple[int | None, dict[str, Any]] | None = None
    unstarted_spec: dict[str, Any] | None = None
    compared_generation: int | None = None
    store: RunStore | None = None  # the run's storage as the last observation reached it (to write PUBLISHED.json)

    def finished(self) -> None:
        """The run ended: drop what only deciding needs (its parsed spec and stage graph, spec copies, the views last
        seen: ~8 KiB a run), as a run found finished after a restart never holds them. A finished run's reconcile
        reads only its status (`_observe` returns before the spec)."""
        self.parsed = self.spec = self.started_spec = self.unstarted_spec = self.store = self.status_copy = None
        self.observed.clear()
        self.seen_jobs.clear()
        self.expected.clear()

    def changed(self, view: JobView | PodView) -> bool:
        """Whether a watch event's view of a Job or pod differs from what the last reconcile saw."""
        return self.observed.get(_key(view)) != unstamped(view)

    def saw(self, views: Iterable[JobView | PodView]) -> None:
        self.observed.update((_key(v), unstamped(v)) for v in views)

    def created(self, view: JobView) -> None:
        """A Job this operator created, as the API server answered: its watch event then brings nothing new, and
        until that event arrives the Job is expected (see `expected`)."""
        self.saw([view])
        self.expected[view.name] = (time.monotonic(), view)

    def with_expected(self, views: tuple[JobView, ...]) -> tuple[JobView, ...]:
        """The index's Jobs plus those created here that it does not show yet; expectations met or past EXPECT_S
        are dropped."""
        if not self.expected:
            return views
        shown, now = {v.name for v in views}, time.monotonic()
        for name, (since, _) in list(self.expected.items()):
            if name in shown or now - since > EXPECT_S:
                del self.expected[name]
        return views + tuple(view for _, view in self.expected.values())


def unstamped(view: JobView | PodView) -> JobView | PodView:
    """The view less what only the operator's clock adds (when it first saw a Job finished)."""
    return dataclasses.replace(view, finished_at=0.0) if isinstance(view, JobView) and view.finished_at else view


def _key(view: JobView | PodView) -> tuple[str, str]:
    return ("job" if isinstance(view, JobView) else "pod", view.name)


class Observer:
    """The observing half of `controller.Controller`: everything `reconcile.decide` needs about one run."""

    cfg: Config
    api: KubeApi
    metrics: Metrics
    secrets: dict[tuple[str, str], tuple[float, dict[str, str] | None]]
    clients: ClientCache
    settings: Settings

    def store_for(self, run: AlignmentRun, secret: dict[str, str] | None, secret_name: str | None) -> RunStore:
        if self.cfg.store_factory is not None:
            return self.cfg.store_factory(run, secret)
        st = run.spec.storage
        return self.clients.store(st.endpoint if st else None, st.region if st else None, secret, secret_name)

    async def _secret(self, ns: str, name: str) -> dict[str, str] | None:
        """The run's credentials, re-read at most every timer_s (rotation is picked up; no read per event)."""
        cached = self.secrets.get((ns, name))
        if cached is not None and time.monotonic() - cached[0] < self.cfg.timer_s:
            return cached[1]
        value = await self.api.read_secret(ns, name)
        if value is not None:  # a missing Secret is looked up again on the next pass
            self.secrets[(ns, name)] = (time.monotonic(), value)
        return value

    # -- observing ------------------------------------------------------------------------------------------------

    def _parse(self, rs: RunState, body: Any, ns: str, name: str) -> tuple[AlignmentRun | None, str, list[PlannedStage],
                                                                            str | None]:
        """The spec, validated as the CRD would; parsed once per generation (the spec changes only with it)."""
        generation = body.get("metadata", {}).get("generation")
        if rs.parsed is None or generation is None or rs.parsed[0] != generation:
            try:
                run = validate_for_cluster(body, self.cfg.default_storage)
            except SpecError as e:
                rs.parsed = (generation, None, "", [], f"{e.field}: {e.message}")
            else:
                assert run.spec.storage is not None
                root = run_root(run.spec.storage.uri, ns, name, rs.uid)
                rs.parsed = (generation, run, root, stage_graph(run.spec, root), None)
        return rs.parsed[1:]

    def _observed_status(self, rs: RunState, body: Any) -> dict[str, Any]:
        """The run's status as the API server has it: the body's, unless the body predates this operator's last
        status patch (its watch event is still on the way; another change, such as kopf's finalizer, may have
        come first), then the status written. Its resourceVersion is kept (`rs.basis`): the status patch that
        follows applies only if the run is still at it."""
        version = body.get("metadata", {}).get("resourceVersion")
        if rs.written is not None and older_version(version, rs.written[0]):
            rs.basis = rs.written[0]
            return rs.written[1]
        rs.basis = str(version) if version else None
        # Most reconciles see the run at the version the last one saw (woken by its Jobs and pods): its status is
        # copied out of kopf's view once per version. Read-only, as the written status above.
        if rs.basis is None or rs.status_copy is None or rs.status_copy[0] != rs.basis:
            rs.status_copy = (rs.basis or "", _plain(body.get("status") or {}))
        return rs.status_copy[1]

    async def _observe(self, rs: RunState, body: Any, index: Any, pod_index: Any) -> Observed:
        meta = body.get("metadata", {})
        ns, name = meta.get("namespace", "default"), meta.get("name", "")
        rs.observed.clear()  # an early return below leaves it empty: every event wakes the run
        status = self._observed_status(rs, body)
        generation = meta.get("generation")
        obs = Observed(ns, name, rs.uid, generation, status, time.time(), settings=self.settings)
        if reconcile.terminal(status):
            return obs
        if rs.spec is None or generation is None or rs.spec[0] != generation:  # the spec changes only with it
            rs.spec = (generation, _plain(body.get("spec") or {}))
        spec_now = rs.spec[1]
        if not status.get("stages"):
            rs.unstarted_spec = spec_now  # what a reconcile that starts the first stage decides with
        elif rs.started_spec is None or rs.compared_generation != generation or generation is None:
            if rs.started_spec is None:  # the first stage started with the spec the reconcile before this one saw
                rs.started_spec = spec_now if rs.unstarted_spec is None else rs.unstarted_spec
            field = first_difference(rs.started_spec, spec_now, "spec", ignore={"spec.suspend"})
            if field:
                rs.spec_violation = f"{field}: immutable once the run has started (only spec.suspend may change)"
            rs.compared_generation = generation
        run, root, graph, error = self._parse(rs, body, ns, name)
        if rs.spec_violation or run is None:
            return dataclasses.replace(obs, spec_violation=rs.spec_violation, spec_error=error)
        views = tuple(index.get(rs.uid, ns)) if index is not None else ()
        rs.seen_jobs.update(v.name for v in views)  # what the watch showed; a Job only expected is not "seen"
        views = rs.with_expected(views)
        pods = tuple(pod_index.get(rs.uid, ns)) if pod_index is not None else ()
        rs.saw(views)
        rs.saw(pods)
        obs = dataclasses.replace(obs, graph=graph, spec=run.spec, root=root, jobs=views, pods=pods,
                                  seen_jobs=frozenset(rs.seen_jobs), index_complete=rs.first_pass)
        if reconcile.workloads_needed(run.spec, status):
            try:
                found = [workload_view(w, rs.uid) for w in await self.api.list_workloads(ns)]
            except Exception as e:  # no Kueue CRD, no RBAC: the status says the Jobs cannot be paused
                obs = dataclasses.replace(obs, workload_problem=api_error(e))
            else:
                names = {v.name for v in views}
                obs = dataclasses.replace(obs, workloads=tuple(w for w in found if w.job in names))

        # Credentials for reading manifests (the Jobs get them from the same Secret by reference).
        secret, secret_problem = None, None
        ref = run.spec.storage.secret_ref if run.spec.storage else None
        if ref:
            try:
                secret = await self._secret(ns, ref.name)
            except Exception as e:  # API trouble: try again later
                secret_problem = api_error(e)
            else:
                if secret is None:
                    secret_problem = f"Secret {ref.name} not found"
                else:
                    rs.secrets = tuple(v for v in secret.values() if len(v) >= 4)
        storage_problem = None
        manifests: dict[str, Any] = {}
        progress = None
        try:
            store = rs.store = self.store_for(run, secret, ref.name if ref else None)
            by_key = {s.key: s for s in graph}
            for key in reconcile.manifests_to_read(obs):
                manifests[key] = await asyncio.to_thread(store.manifests, by_key[key].args)
            current = _running_stage(status, by_key)
            if current is not None and time.monotonic() - rs.last_progress >= self.cfg.progress_s:
                rs.last_progress = time.monotonic()
                frac = await asyncio.to_thread(store.progress, current.args)
                if frac is not None:
                    progress = (current.key, frac)
        except StorageError as e:
            storage_problem = str(e)
        except Exception as e:  # e.g. boto3 refusing an endpoint or region: a status condition, not a crash loop
            storage_problem = f"storage client: {type(e).__name__}: {str(e)[:200]}"
        if storage_problem:
            self.metrics.storage_errors.inc()
        return dataclasses.replace(obs, manifests=manifests, storage_problem=storage_problem,
                                   secret_problem=secret_problem, progress=progress)


def older_version(version: Any, than: str) -> bool:
    """Whether resourceVersion `version` predates `than`. They are etcd revisions on every API server in use;
    where one is not a number, only "not the same" is known, and the body is taken as older."""
    try:
        return int(version) < int(than)
    except (TypeError, ValueError):
        return version != than


def _running_stage(status: Mapping[str, Any], by_key: Mapping[str, PlannedStage]) -> PlannedStage | None:
    """The stage status names as current, if its record says it runs (its heartbeat is worth reading)."""
    it, stage = status.get("iteration"), status.get("stage")
    if not isinstance(it, int) or not stage:
        return None
    key = f"iter-{it:02d}/{stage}"
    rec = next((r for r in status.get("stages") or [] if r.get("name") == key), None)
    return by_key.get(key) if rec is not None and rec.get("state") == reconcile.RUNNING else None


def _plain(obj: Any) -> Any:
    """A deep plain-dict copy (kopf bodies are views)."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


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
