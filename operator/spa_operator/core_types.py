"""The decision core's vocabulary: what was observed about one run (`Observed`, with its Job, pod and Workload views
and the operator `Settings` decisions depend on), what the decision concluded (`Outcome`), and what to do
(`Decision`, with the `Event`s and `MetricValues` of the new status). Plain frozen data, importing nothing of the
operator but the planner and the allow-lists: `reconcile.decide` maps observations to an outcome and actions,
`status.render` turns the outcome into the new status in one pass, `observe` builds the views from the API objects."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from spa_workers.contract import StageManifest

from spa_operator.planner import PlannedStage
from spa_operator.tenancy import Allowed

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
PHASES = (PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED)
QUEUED = "queued"  # the waiting reason of a Job Kueue has not admitted yet
# An active Job without any pod this long after its creation: the pod was refused (Pod Security admission, quota).
NO_POD = "NoPodCreated"
GANG_INCOMPLETE = "gang incomplete"  # a multi-node stage with some of its pods unschedulable


def gang_incomplete(placed: int, size: int, reason: str) -> str:
    """The waiting reason of a gang whose pods are not all placed: "gang incomplete: 1/2 pods scheduled (...)"."""
    return f"{GANG_INCOMPLETE}: {placed}/{size} pods scheduled ({reason})"

# ------------------------------------------------------------------------------------------------- observations


@dataclasses.dataclass(frozen=True)
class PodView:
    """One pod of a run's Job, as far as the decision needs it."""

    name: str
    job: str
    stage_key: str
    attempt: int
    live: bool  # not Succeeded/Failed (terminating ones included): it may still write to storage
    waiting: str = ""  # why it does not run: a container waiting reason or the PodScheduled reason; "" if running
    since: float = 0.0  # wall clock (Unix s) the pod was created
    scheduled: bool = True  # False while the scheduler says it cannot place it (PodScheduled False)
    terminating: bool = False  # has a deletionTimestamp: deleted, but its containers may still run


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
    # the Progressing reason it gives: Forbidden (RBAC), QuotaExceeded, AdmissionDenied, or JobCreationBlocked
    create_blocked_reason: str = "JobCreationBlocked"
    settings: Settings = Settings()


# ------------------------------------------------------------------------------------------------------ decisions


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What `reconcile.decide` concluded about a run, before any status is written: `status.render` derives the
    complete new status, its Events and its metric values from it (and from the observed status) in one pass."""

    phase: str
    # stage key -> the stage's new status record, for the stages started so far; None: the observed ones stay
    records: Mapping[str, Mapping[str, Any]] | None = None
    keep: bool = False  # a finished run: its status stays as observed
    failure: tuple[str, str] | None = None  # (Failed condition reason, message) of a failed run
    final_model: str | None = None  # the model a succeeded run published
    # a succeeded run's status.outputs: the planner's verdict (`planner.publication`), as in PUBLISHED.json
    outputs: Mapping[str, Any] | None = None
    reason: str = ""  # the planner's word: why the run ended, or what it waits for
    waiting: Mapping[str, tuple[str, float]] = dataclasses.field(default_factory=dict)  # stage -> (why, since)
    orphans: Sequence[str] = ()  # stages whose next attempt waits for pods of an earlier one to stop
    blocked: str | None = None  # why no Job can be created now (API refusal, storage, Secret)
    note: str | None = None  # the message of a suspended or resuming run


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class MetricValues:
    phase: str
    iteration: int | None
    progress: float | None
    running: Mapping[tuple[str, str], float]  # (iteration, stage) -> start time of each running stage
    quality: Mapping[tuple[str, str], float]  # (iteration, metric key) -> value, for succeeded stages
    outcomes: Sequence[tuple[str, str]] = ()  # (stage, outcome) of attempts that finished in this decision
    durations: Sequence[tuple[str, float]] = ()  # (stage, seconds) of stages that succeeded in this decision
    cost: Mapping[str, float] = dataclasses.field(default_factory=dict)  # status.cost.total: the run's ledger
    remaining_s: float | None = None  # status.estimatedRemainingSeconds (None: unknown)
    percent: float | None = None  # status.progressPercentage


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
