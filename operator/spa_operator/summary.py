"""Per-iteration results read from stage manifests (the `spa run` table; later the operator's status)."""

from __future__ import annotations

from dataclasses import dataclass

from spa_workers import contract
from spa_workers.contract import ManifestKeys as K
from spa_workers.contract import StageManifest

from spa_operator.planner import PlannedStage


@dataclass
class IterationSummary:
    iteration: int
    pairs: int | None = None
    reward_gap: float | None = None
    refined_fraction: float | None = None
    heldout_agreement: float | None = None
    win_rate: float | None = None  # percent
    win_rate_se: float | None = None
    lc_win_rate: float | None = None  # percent, length-controlled
    lc_win_rate_se: float | None = None
    loss: float | None = None
    wall_s: float = 0.0


def summarize(graph: list[PlannedStage]) -> list[IterationSummary]:
    """One row per iteration, from whichever stage manifests exist (missing figures stay None)."""
    rows: dict[int, IterationSummary] = {}
    for s in graph:
        manifests = contract.read_stage_manifests(s.args)
        if manifests is None:
            continue
        row = rows.setdefault(s.iteration, IterationSummary(s.iteration))
        row.wall_s += max(m.timings.get("wall_s", 0.0) for m in manifests)
        if s.stage == contract.JUDGE:
            row.pairs = sum(m.counts.get(K.PAIRS, 0) for m in manifests)
            row.reward_gap = _weighted(manifests, K.REWARD_GAP, K.PAIRS)
        elif s.stage in (contract.TRAIN, contract.SEED_TRAIN):
            row.loss = manifests[0].metrics.get(K.LOSS)
            if s.stage == contract.SEED_TRAIN:  # plain DPO on gold pairs: nothing is refined
                row.pairs = manifests[0].counts.get(K.PAIRS)
            else:
                row.refined_fraction = manifests[0].metrics.get(K.REFINED_FRACTION)
        elif s.stage == contract.EVALUATE:
            m = manifests[0].metrics
            row.heldout_agreement = m.get(K.HELDOUT_AGREEMENT)
            row.win_rate, row.win_rate_se = m.get(K.WIN_RATE), m.get(K.WIN_RATE_SE)
            row.lc_win_rate, row.lc_win_rate_se = m.get(K.LC_WIN_RATE), m.get(K.LC_WIN_RATE_SE)
    return [rows[i] for i in sorted(rows)]


def _weighted(manifests: list[StageManifest], metric: str, weight: str) -> float | None:
    pairs = [(m.metrics[metric], m.counts.get(weight, 0)) for m in manifests if metric in m.metrics]
    total = sum(w for _, w in pairs)
    if not pairs or total == 0:
        return None
    return sum(v * w for v, w in pairs) / total
