"""The decision core's inputs and output: what was observed about one run (`Observed`, with its Job, pod and
Workload views and the operator `Settings` decisions depend on) and what to do (`Decision`). Plain frozen data;
`reconcile.decide` maps one to the other and `observe` builds the views from the API objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from spa_workers.contract import StageManifest

from spa_operator.planner import PlannedStage
from spa_operator.status import Event, MetricValues
from spa_operator.tenancy import Allowed

# ------------------------------------------------------------------------------------------------- observations


@dataclasses.dataclass(frozen=True)
class PodView:
    """One pod of a run's Job, as far as the decision needs it."""

    name: str
    job: str
    stage_key: str
    attempt: int
    live: bool  # not Succeeded/Failed: it may still write to storage
    waiting: str = ""  # why it does not run: a container waiting reason or the PodScheduled reason; "" if running
    since: float = 0.0  # wall clock (Unix s) the pod was created
    scheduled: bool = True  # False while the scheduler says it cannot place it (PodScheduled False)


@dataclasses.dataclass(frozen=True)
class JobView:
    """What the decision needs from one Job."""

    name: str
    stage_key: str
    attempt: int
    state: str  # active | suspended | succeeded | failed
    permanent: bool = False
    reason: str = ""
    owner_uid: str = ""
    created: float = 0.0  # wall clock (Unix s)
    deleting: bool = False  # has a deletionTimestamp: its attempt is over
    finished_at: float = 0.0  # monotonic time the operator first saw it finished (for the latency metric)
    suspended_since: float = 0.0  # wall clock of its Suspended condition (the last suspend); 0: not known
    gang: int = 0  # a multi-node stage's Job: the pods that must all run (its parallelism); 0: not a gang


@dataclasses.dataclass(frozen=True)
class WorkloadView:
    """The Kueue Workload of one of the run's Jobs (runs with queueName): Kueue admits the Job through it."""

    name: str
    job: str  # the Job that owns it
    active: bool  # spec.active; False: Kueue evicts the Job (suspends it) and does not admit it again
    paused: bool = False  # deactivated by this operator for spec.suspend (annotation spa.dev/paused)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The operator's configuration that decisions depend on."""

    pending_timeout_s: float | None = None  # a pod waiting (not queued) this long fails its attempt; None: never
    queued_timeout_s: float | None = None  # a Job Kueue has not admitted this long fails its attempt; None: never
    # What runs may name: images, judge endpoints, accounts, Secrets, capabilities (tenancy.Allowed).
    allowed: Allowed = dataclasses.field(default_factory=Allowed)
    worker_service_account: str | None = None  # the operator's own worker account: a run may always name it


@dataclasses.dataclass(frozen=True)
class Observed:
    """Everything known about one run at one moment."""

    namespace: str
    name: str
    uid: str
    generation: int | None
    status: Mapping[str, Any]  # the run's status as the API server has it
    now: float  # wall clock, Unix seconds
    graph: Sequence[PlannedStage] = ()
    spec: Any = None  # AlignmentRunSpec; None with spec_error
    root: str = ""
    spec_error: str | None = None  # "field: message" for an invalid spec
    spec_violation: str | None = None  # a field changed after the start
    jobs: Sequence[JobView] = ()  # the Jobs labelled with this run's uid
    pods: Sequence[PodView] = ()  # the pods labelled with this run's uid
    seen_jobs: frozenset[str] = frozenset()  # every Job of the run a watch event has shown
    index_complete: bool = False  # the Job list is complete: a recorded Job missing from it was deleted
    manifests: Mapping[str, Sequence[StageManifest] | None] = dataclasses.field(default_factory=dict)
    storage_problem: str | None = None
    secret_problem: str | None = None
    progress: tuple[str, float] | None = None  # (stage key, fraction) read from the heartbeat
    # The Workloads of the run's Jobs, read while a run with queueName is or was suspended (see workloads_needed)
    workloads: Sequence[WorkloadView] = ()
    workload_problem: str | None = None  # they could not be read (no Kueue CRD, no RBAC): why
    create_refused: Mapping[str, str] = dataclasses.field(default_factory=dict)  # stage key -> API refusal (422)
    create_blocked: str | None = None  # a create that may work later (403, foreign 409, API down): why
    settings: Settings = Settings()


# ------------------------------------------------------------------------------------------------------ decisions


@dataclasses.dataclass(frozen=True)
class Create:
    stage: PlannedStage
    attempt: int


@dataclasses.dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    create: tuple[Create, ...] = ()
    delete_jobs: tuple[str, ...] = ()  # deleted with their pods (propagationPolicy Background)
    delete_pods: tuple[str, ...] = ()  # pods left behind by a Job deleted without propagation
    suspend_jobs: tuple[str, ...] = ()
    resume_jobs: tuple[str, ...] = ()
    deactivate_workloads: tuple[str, ...] = ()  # Kueue Workloads to set spec.active=false and mark paused
    activate_workloads: tuple[str, ...] = ()  # Workloads this operator paused, to set active again
    events: tuple[Event, ...] = ()
    metrics: MetricValues | None = None
    requeue_s: float | None = None  # look again after this long at the latest (None: when something changes)
    transition: bool = False  # a Job was created because another finished (latency metric)
    # (URI, JSON) of the run's PUBLISHED.json marker, written before the status that says Succeeded
    publish: tuple[str, str] | None = None
