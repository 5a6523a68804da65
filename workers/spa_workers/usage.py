"""What every stage spends whatever it does, for its ledger (`contract.Ledger`): CPU time (measured with getrusage,
every rank's), bytes through the storage layer (every rank's), and requested GPUs (and CPUs) x the wall time of its
pods, from the requests the executor passes in the environment (`contract.REQUESTED_GPUS_ENV`).

A process that hands a stage over to launched ranks (`accelerate launch`: train.run) passes what it used and when it
started on to them (`hand_over`), so the model downloads before the launch count too. A stage forked from `spa run`'s
warm server counts from its fork: fork(2) resets the child's CPU times, and its start time is the fork's, so the
libraries the server imported once are in no stage's ledger.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

from spa_workers import contract, preload, storage

if TYPE_CHECKING:
    from spa_workers.runner import StageWork

Usage = tuple[float, int, int]  # (CPU seconds, bytes read, bytes written)

# Unix time the stage's first process started, handed down to processes it starts for the same stage (the ranks of
# `accelerate launch`), so wall time counts from the start of the pod's work, not of a rank.
STARTED_ENV = "SPA_STAGE_STARTED"


def stage_started() -> float:
    return float(os.environ.get(STARTED_ENV) or preload.process_start_time())


# "cpu,read,written" a process used before it handed the stage over to launched ranks (train.run's checks and model
# downloads before `accelerate launch`): the first rank of each node counts it.
HANDED_OVER_ENV = "SPA_STAGE_USAGE_BEFORE_LAUNCH"


def _own_usage() -> Usage:
    """(CPU seconds of this process and its finished children, bytes read, bytes written through storage), plus
    what the process that launched this node's ranks used (first rank of a node only)."""
    cpu = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    read, written = storage.traffic()
    before = os.environ.get(HANDED_OVER_ENV)
    if before and os.environ.get("LOCAL_RANK", "0") == "0":
        c, r, w = before.split(",")
        cpu, read, written = cpu + float(c), read + int(r), written + int(w)
    return cpu, read, written


def hand_over() -> None:
    """Before this process execs a launcher for the stage: pass its usage and start time on to the ranks."""
    cpu, read, written = _own_usage()
    os.environ[HANDED_OVER_ENV] = f"{cpu:.3f},{read},{written}"
    os.environ.setdefault(STARTED_ENV, str(preload.process_start_time()))


def baseline() -> Usage:
    """The baseline a stage's usage counts from: CPU time from the process start, storage traffic from the stage's
    start (a forked stage process inherits its parent's counters, not its CPU time)."""
    return (0.0, *storage.traffic())


def of_other_ranks(is_main: bool, since: Usage) -> list[Usage]:
    """Every rank's usage since `since` (gathered: a collective, all ranks call it); the main drops its own entry."""
    from accelerate.utils import gather_object

    now = _own_usage()
    mine = tuple(a - b for a, b in zip(now, since, strict=True))
    everyone = gather_object([mine])
    return everyone[1:] if is_main else []


def spend(work: StageWork, since: Usage, other_ranks: list[Usage],
                wall: float, published_locally: int) -> None:
    """The ledger entries every stage has: CPU time (measured, all ranks), storage traffic (all ranks; outputs moved
    into a local output folder count as written), and requested GPUs (and CPUs) x wall time x pods."""
    own = tuple(a - b for a, b in zip(_own_usage(), since, strict=True))
    cpu, read, written = (sum(v) for v in zip(own, *other_ranks, strict=True))
    pods = getattr(work.args, "nodes", 1)  # a multi-node train stage's manifest is written by one pod for all
    work.spend(contract.Ledger.CPU_SECONDS, round(cpu, 3))
    work.spend(contract.Ledger.BYTES_READ, read)
    work.spend(contract.Ledger.BYTES_WRITTEN, written + published_locally)
    gpus = float(os.environ.get(contract.REQUESTED_GPUS_ENV) or 0)
    work.spend(contract.Ledger.ACCELERATOR_SECONDS, round(gpus * pods * wall, 3))
    cpus = os.environ.get(contract.REQUESTED_CPUS_ENV)
    if cpus:
        work.spend(contract.Ledger.CPU_SECONDS_REQUESTED, round(float(cpus) * pods * wall, 3))
