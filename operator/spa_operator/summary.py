"""Per-iteration results read from stage manifests: the `spa run` table and the run's saved report
(`report.md`, `report.json`, `report.svg` in the run root), with the figures the operator publishes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from html import escape

from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys as K
from spa_workers.contract import StageManifest

from spa_operator import cost_report
from spa_operator.planner import PlannedStage, final_model, stage_graph
from spa_operator.spec import AlignmentRun


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
    reward_accuracy: float | None = None
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
            row.reward_accuracy = manifests[0].metrics.get(K.REWARD_ACCURACY)
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


# What each column means, in the table, report.md and report.json (the operator's spa_iteration_* metrics are the
# same figures).
COLUMNS: dict[str, tuple[str, str]] = {
    "iteration": ("iteration", "0 is the seed DPO on the gold pairs; i >= 1 are SPA iterations."),
    "pairs": ("pairs", "Preference pairs trained on: gold seed pairs (iteration 0), pairs the judge kept (i >= 1)."),
    "reward_gap": ("reward gap", "Mean implicit-reward gap r(chosen) - r(rejected) of the judged pairs, "
                   "r = beta * (log pi_{i-1} - log pi_init) over answer tokens; higher: the judge separates "
                   "answers more clearly."),
    "refined_fraction": ("refined", "Fraction of training pairs SPA self-refinement relabelled: low-confidence "
                         "pairs (smallest implicit-reward margins) whose labels it smoothed, over the stage."),
    "heldout_agreement": ("held-out agreement", "Fraction of held-out gold pairs where the trained model's "
                          "implicit reward prefers the gold chosen answer; 0.5 is chance."),
    "win_rate": ("win rate %", "Percent of evaluation prompts where the judge preferred the model's answer to the "
                 "reference's (ties 1/2, both answer orders), ± its standard error; optional (evaluation.winRate)."),
    "lc_win_rate": ("LC win rate %", "Length-controlled win rate (alpaca_eval's GLM: the win rate had both answers "
                    "been of equal length), ± its standard error."),
    "loss": ("DPO loss", "Mean DPO loss over the train stage (log 2 = 0.693 means no preference learnt)."),
    "reward_accuracy": ("reward accuracy", "Fraction of training pairs whose implicit reward ranked chosen above "
                        "rejected, over the train stage."),
    "wall_s": ("wall time", "Seconds the iteration's stages took (shards: the slowest)."),
}
PLOTTED = ("reward_gap", "refined_fraction", "heldout_agreement", "loss")
REPORT_FILES = ("report.md", "report.json", "report.svg")


def _cell(value: float | int | None, key: str) -> str:
    if value is None:
        return "-"
    if key == "iteration":
        return "seed" if value == 0 else str(value)
    if key == "pairs":
        return str(value)
    if key == "wall_s":
        return f"{value:.1f}s"
    if key in ("win_rate", "lc_win_rate"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def _cell_of(row: IterationSummary, key: str) -> str:
    text = _cell(getattr(row, key), key)
    se = getattr(row, f"{key}_se", None)
    return f"{text} ± {se:.1f}" if se is not None and text != "-" else text


def table_rows(rows: list[IterationSummary]) -> list[list[str]]:
    return [[_cell_of(r, key) for key in COLUMNS] for r in rows]


def _scale(values: list[float], lo_px: float, hi_px: float) -> list[float]:
    """Map values linearly onto [lo_px, hi_px] (a constant series sits at lo_px)."""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return [lo_px + (v - lo) / span * (hi_px - lo_px) for v in values]


def _svg(rows: list[IterationSummary]) -> str:
    """One small line chart per plotted figure, over iterations (hand-written SVG: no plotting dependency)."""
    w, h, pad = 260, 170, 34
    panels = []
    for n, key in enumerate(PLOTTED):
        points = [(r.iteration, getattr(r, key)) for r in rows if getattr(r, key) is not None]
        x0 = (n % 2) * (w + 20)
        y0 = (n // 2) * (h + 20)
        parts = [f'<g transform="translate({x0},{y0})">',
                 f'<rect width="{w}" height="{h}" fill="white" stroke="#ccc"/>',
                 f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{escape(COLUMNS[key][0])}</text>']
        if points:
            xs = _scale([float(p[0]) for p in points], pad, w - pad)
            ys = _scale([float(p[1]) for p in points], h - pad + 6, 2 * pad)
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
            parts.append(f'<polyline points="{coords}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
            for (it, value), x, y in zip(points, xs, ys, strict=True):
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#1f77b4">'
                             f'<title>iteration {it}: {value:.4f}</title></circle>'
                             f'<text x="{x:.1f}" y="{h - 8}" text-anchor="middle" font-size="10">{it}</text>'
                             f'<text x="{x + 5:.1f}" y="{y - 5:.1f}" font-size="10">{value:.3g}</text>')
        else:
            parts.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="11">no data</text>')
        panels.append("".join(parts) + "</g>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 20}" height="{2 * h + 20}" '
            f'font-family="sans-serif">' + "".join(panels) + "</svg>\n")


def _markdown(run: AlignmentRun, root: str, rows: list[IterationSummary], final: str | None) -> str:
    head = [label for label, _ in COLUMNS.values()]
    lines = [f"# {run.metadata.name}: per-iteration results", "", f"Run root: `{root}`",
             f"Final model: `{final}`" if final else "The run has not finished: figures of missing stages are `-`.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "![per-iteration figures](report.svg)", "", "## Columns", ""]
    lines += [f"- **{label}**: {text}" for label, text in COLUMNS.values()]
    return "\n".join(lines) + "\n"


def write_report(run: AlignmentRun, root: str) -> list[str]:
    """Write report.md, report.json and report.svg into the run root; returns their URIs."""
    graph = stage_graph(run.spec, root)
    rows = summarize(graph)
    last = contract.read_stage_manifests(graph[-1].args) if graph else None
    final = final_model(run.spec, root) if last is not None else None
    cost = cost_report.read(graph, rows)
    doc = {"run": run.metadata.name, "namespace": run.metadata.namespace, "root": root, "final_model": final,
           "columns": {key: text for key, (_, text) in COLUMNS.items()},
           "iterations": [dataclasses.asdict(r) for r in rows], "cost": cost.to_json()}
    contents = (_markdown(run, root, rows, final) + cost.markdown(), json.dumps(doc, indent=2) + "\n", _svg(rows))
    uris = [storage.join(root, name) for name in REPORT_FILES]
    for uri, text in zip(uris, contents, strict=True):
        storage.write_text(uri, text)
    return uris
