"""What `spa run --rerun-from STAGE` / `--force` do to storage: which stage outputs are set aside (a pure decision),
moving them aside, and settling them once the run is over.

Nothing is deleted up front: each output to redo moves to `.discarded/<stamp>/<stage>` in its iteration folder
(aside.py) and is deleted only once its stage has published a new manifest (the worker does it as it publishes;
`settle` catches the rest, e.g. sharded stages). One whose replacement did not succeed stays there and is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from spa_workers import aside, contract, storage

from spa_operator.local import StageCheck, StageStatus, dependents
from spa_operator.planner import PlannedStage


@dataclass(frozen=True)
class Decision:
    set_aside: tuple[str, ...] = ()  # stages whose outputs move aside before the run, in graph order
    refused: tuple[str, ...] = ()  # stale stages that the flags given do not redo: the run stops, naming them


def decide(graph: list[PlannedStage], statuses: Mapping[str, StageStatus], rerun_from: str | None = None,
           force: bool = False) -> Decision:
    """Which outputs to set aside. `--rerun-from` redoes a stage and every stage after it; `--force` redoes the
    stale stages; without either (or with a `--rerun-from` that leaves stale stages before it) stale outputs refuse
    the run. Assumes at most one flag (the CLI refuses both)."""
    stale = [s.key for s in graph if statuses[s.key].check is StageCheck.STALE]
    redo = dependents(graph, rerun_from) if rerun_from else stale if force else []
    return Decision(tuple(redo), tuple(k for k in stale if k not in redo))


@dataclass(frozen=True)
class SetAside:
    key: str
    files: int
    to: str


def present(graph: list[PlannedStage], keys: tuple[str, ...]) -> list[tuple[str, int]]:
    """(stage, files) of the stages among `keys` that have anything in storage, to list before moving them."""
    by_key = {s.key: s for s in graph}
    found = [(k, len(storage.list_files(by_key[k].output))) for k in keys]
    return [(k, n) for k, n in found if n]


def move(graph: list[PlannedStage], listed: list[tuple[str, int]]) -> list[SetAside]:
    """Move the outputs `present` listed aside, under one stamp."""
    by_key, when = {s.key: s for s in graph}, aside.stamp()
    moved = [(key, files, aside.move_aside(by_key[key].output, when)) for key, files in listed]
    return [SetAside(key, files, to) for key, files, to in moved if to]


def settle(graph: list[PlannedStage]) -> list[SetAside]:
    """Delete the set-aside outputs whose stage has published again; the ones kept (their stage has not), with
    where they are."""
    kept, listed = [], {}
    for s in graph:
        parent, _, name = s.output.rstrip("/").rpartition("/")
        if parent not in listed:
            listed[parent] = aside.set_aside_under(parent)
        for old in listed[parent]:
            if old.rstrip("/").rpartition("/")[2] != name:
                continue
            if contract.read_stage_manifests(s.args) is not None:
                aside.forget(old)
            else:
                kept.append(SetAside(s.key, len(storage.list_files(old)), old))
    return kept
