"""What a run spent, summed: a stage's shards, an iteration's stages, the run. Pure: both executors' readers (the
local report and `spa run`'s console, the operator's status and metrics) hand it the ledgers they read from stage
manifests (`contract.StageManifest.ledger`) or from the run's status, and get the same sums.

A sum is exact where every part is; a key that any part estimated stays marked estimated in the sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from spa_workers.contract import WORK_SECONDS, Ledger, StageManifest

KEYS = Ledger.KEYS


@dataclass(frozen=True)
class Cost:
    """A ledger: amounts by `contract.Ledger` key, and the keys whose amount includes an estimate."""

    amounts: Mapping[str, float] = field(default_factory=dict)
    estimated: frozenset[str] = frozenset()

    def get(self, key: str) -> float:
        return float(self.amounts.get(key, 0.0))


def sum_ledgers(parts: Iterable[Cost]) -> Cost:
    """The sum of ledgers (a stage's shards, an iteration's stages, a run's iterations), in the contract's key order.
    Unknown keys and non-finite or negative amounts are left out: a sum never passes on what the contract refuses."""
    totals: dict[str, float] = {}
    estimated: set[str] = set()
    for part in parts:
        for key, value in part.amounts.items():
            if key in KEYS and isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                totals[key] = totals.get(key, 0.0) + float(value)
        estimated |= set(part.estimated) & set(KEYS)
    ordered = {k: _tidy(totals[k]) for k in KEYS if k in totals}
    return Cost(ordered, frozenset(k for k in estimated if k in ordered))


def _tidy(value: float) -> float | int:
    """Whole amounts as ints (counts stay counts in JSON), others to 6 significant digits (compact, still exact for
    what a person reads)."""
    if value == int(value) and abs(value) < 2**53:
        return int(value)
    return float(f"{value:.6g}")


def of_manifests(manifests: Sequence[StageManifest]) -> Cost:
    """One stage's ledger: the sum over its shards' manifests."""
    return sum_ledgers(Cost(m.ledger, frozenset(m.ledger_estimated)) for m in manifests)


def per_iteration(stage_costs: Iterable[tuple[int, Cost]]) -> dict[int, Cost]:
    """(iteration, stage ledger) pairs -> each iteration's sum, in iteration order."""
    groups: dict[int, list[Cost]] = {}
    for iteration, cost in stage_costs:
        groups.setdefault(iteration, []).append(cost)
    return {i: sum_ledgers(groups[i]) for i in sorted(groups)}


def cumulative(by_iteration: Mapping[int, Cost]) -> dict[int, Cost]:
    """What the run had spent by the end of each iteration (iteration i's model cost every stage up to i)."""
    out, parts = {}, []
    for i in sorted(by_iteration):
        parts.append(by_iteration[i])
        out[i] = sum_ledgers(parts)
    return out


# ------------------------------------------------------------------------------- the run's status (operator)

# A stage record's fields (status.stages[]): the stage's ledger, its estimated keys, and the seconds of its slowest
# shard spent on the items it counts (the ETA's rates).
RECORD_LEDGER = "ledger"
RECORD_ESTIMATED = "ledgerEstimated"
RECORD_WORK_SECONDS = "workSeconds"


def record_fields(manifests: Sequence[StageManifest]) -> dict[str, object]:
    """What a succeeded stage's status record carries about its cost (bounded: at most one entry per ledger key)."""
    cost = of_manifests(manifests)
    out: dict[str, object] = {}
    if cost.amounts:
        out[RECORD_LEDGER] = dict(cost.amounts)
    if cost.estimated:
        out[RECORD_ESTIMATED] = sorted(cost.estimated)
    work = [m.timings[WORK_SECONDS] for m in manifests if isinstance(m.timings.get(WORK_SECONDS), int | float)]
    if work:
        out[RECORD_WORK_SECONDS] = round(max(work), 3)
    return out


def of_record(record: Mapping[str, object]) -> Cost:
    ledger = record.get(RECORD_LEDGER)
    estimated = record.get(RECORD_ESTIMATED)
    return Cost(ledger if isinstance(ledger, Mapping) else {},
                frozenset(e for e in estimated if isinstance(e, str)) if isinstance(estimated, list) else frozenset())


def status_cost(records: Iterable[Mapping[str, object]]) -> dict[str, object] | None:
    """status.cost: the run's total ledger over its stage records, and which totals include estimates; None before any
    stage has counted anything. Bounded: one number per ledger key."""
    total = sum_ledgers(of_record(r) for r in records)
    if not total.amounts:
        return None
    out: dict[str, object] = {"total": dict(total.amounts)}
    if total.estimated:
        out["estimated"] = sorted(total.estimated)
    return out
