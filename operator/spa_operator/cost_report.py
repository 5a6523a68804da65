"""The run report's cost section (report.md, report.json, `spa run` / `spa report`): the ledger per iteration and in
total, read from the stage manifests, and, where the run measured held-out agreement or a win rate, what each point
gained over the seed model cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spa_workers import contract
from spa_workers.contract import Ledger

from spa_operator import ledger
from spa_operator.ledger import Cost
from spa_operator.planner import PlannedStage

# (ledger key, column label, unit divisor, format): the table's columns, in the contract's order.
HOUR, GB = 3600.0, 1e9
COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    (Ledger.GOLD_LABELS, "gold labels", 1, "{:.0f}"),
    (Ledger.PROMPTS, "prompts", 1, "{:.0f}"),
    (Ledger.ANSWERS_GENERATED, "answers", 1, "{:.0f}"),
    (Ledger.TOKENS_GENERATED, "tokens generated", 1, "{:.0f}"),
    (Ledger.PAIRS_JUDGED, "pairs judged", 1, "{:.0f}"),
    (Ledger.TOKENS_SCORED, "tokens scored", 1, "{:.0f}"),
    (Ledger.PAIRS_TRAINED, "pairs trained", 1, "{:.0f}"),
    (Ledger.TOKENS_TRAINED, "tokens trained", 1, "{:.0f}"),
    (Ledger.ACCELERATOR_SECONDS, "GPU-hours", HOUR, "{:.4g}"),
    (Ledger.CPU_SECONDS, "CPU-hours", HOUR, "{:.4g}"),
    (Ledger.CPU_SECONDS_REQUESTED, "CPU-hours requested", HOUR, "{:.4g}"),
    (Ledger.BYTES_READ, "GB read", GB, "{:.3g}"),
    (Ledger.BYTES_WRITTEN, "GB written", GB, "{:.3g}"),
    (Ledger.JUDGE_CALLS, "judge calls", 1, "{:.0f}"),
    (Ledger.JUDGE_PROMPT_TOKENS, "judge prompt tokens", 1, "{:.0f}"),
    (Ledger.JUDGE_COMPLETION_TOKENS, "judge completion tokens", 1, "{:.0f}"),
)
ESTIMATE_MARK = "~"
# the quality figures a point is gained in: (IterationSummary field, label, points per unit)
GAINS = (("heldout_agreement", "held-out agreement", 100.0), ("win_rate", "win rate", 1.0))


def cell(cost: Cost, key: str) -> str:
    _, _, divisor, fmt = next(c for c in COLUMNS if c[0] == key)
    if key not in cost.amounts:
        return "-"
    return (ESTIMATE_MARK if key in cost.estimated else "") + fmt.format(cost.get(key) / divisor)


@dataclass
class CostReport:
    iterations: dict[int, Cost]
    total: Cost
    per_point: list[dict[str, Any]]  # iteration, figure, gain in points, and cost per point

    def columns(self) -> list[tuple[str, str]]:
        """(key, label) of the columns some row has (a run without a win-rate judge shows no judge columns)."""
        used = set(self.total.amounts)
        return [(key, label) for key, label, _, _ in COLUMNS if key in used]

    def table(self) -> tuple[list[str], list[list[str]]]:
        cols = self.columns()
        rows = [["seed" if i == 0 else str(i)] + [cell(c, k) for k, _ in cols] for i, c in self.iterations.items()]
        rows.append(["total"] + [cell(self.total, k) for k, _ in cols])
        return ["iteration"] + [label for _, label in cols], rows

    def markdown(self) -> str:
        if not self.total.amounts:
            return ""
        head, rows = self.table()
        lines = ["", "## Cost", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", f"Counted by the stages into their manifests (`{ESTIMATE_MARK}`: an estimate). GPU-hours are "
                  "requested GPUs x wall time of the stage's pods; CPU-hours the CPU time its processes used. Gold "
                  "labels are the seed and held-out pairs, counted once (validate)."]
        if self.per_point:
            lines += ["", "### Per point gained over the seed model", "",
                      "| iteration | figure | gain (points) | GPU-hours per point | CPU-hours per point | "
                      "tokens generated per point |", "|---|---|---|---|---|---|"]
            for p in self.per_point:
                lines.append(f"| {p['iteration']} | {p['figure']} | {p['gain_points']:+.1f} | "
                             + " | ".join(_per_point_cell(p, k) for k in ("gpu_hours", "cpu_hours", "tokens"))
                             + " |")
            lines += ["", "The cost of SPA iterations 1..i (the seed model's own cost left out) over the points of "
                      "the figure gained since the seed model; no gain, no figure."]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"iterations": [{"iteration": i, "ledger": dict(c.amounts), "estimated": sorted(c.estimated)}
                               for i, c in self.iterations.items()],
                "total": dict(self.total.amounts), "estimated": sorted(self.total.estimated),
                "per_point": self.per_point}


def _per_point_cell(p: dict[str, Any], key: str) -> str:
    value = p.get(f"{key}_per_point")
    return "-" if value is None else f"{value:.4g}"


def per_point(iterations: dict[int, Cost], summaries: Sequence[Any]) -> list[dict[str, Any]]:
    """For each SPA iteration with a quality figure that the seed model (iteration 0) also has: the gain in points
    and what iterations 1..i cost per point gained."""
    figures = {s.iteration: s for s in summaries}
    out = []
    seed = figures.get(0)
    for attr, label, scale in GAINS:
        base = getattr(seed, attr, None) if seed else None
        if base is None:
            continue
        for i in sorted(k for k in iterations if k > 0):
            value = getattr(figures.get(i), attr, None)
            if value is None:
                continue
            gain = (value - base) * scale
            spent = ledger.sum_ledgers(iterations[k] for k in iterations if 0 < k <= i)
            row: dict[str, Any] = {"iteration": i, "figure": label, "gain_points": round(gain, 4)}
            if gain > 0:
                row.update(gpu_hours_per_point=spent.get(Ledger.ACCELERATOR_SECONDS) / HOUR / gain,
                           cpu_hours_per_point=spent.get(Ledger.CPU_SECONDS) / HOUR / gain,
                           tokens_per_point=spent.get(Ledger.TOKENS_GENERATED) / gain)
            out.append(row)
    return out


def read(graph: Sequence[PlannedStage], summaries: Sequence[Any] = ()) -> CostReport:
    """The cost of the stages that have manifests, per iteration and in total."""
    found = []
    for s in graph:
        manifests = contract.read_stage_manifests(s.args)
        if manifests is not None:
            found.append((s.iteration, ledger.of_manifests(manifests)))
    iterations = ledger.per_iteration(found)
    return CostReport(iterations, ledger.sum_ledgers(iterations.values()), per_point(iterations, summaries))
