"""Per-iteration results read from stage manifests: the `spa run` table and the run's saved report
(`report.md`, `report.json`, `report.svg` in the run root), with the figures the operator publishes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from html import escape

from spa_workers import contract, storage
from spa_workers.contract import ManifestKeys as K
from spa_workers.contract import StageManifest

from spa_operator import cost_report
from spa_operator.planner import (
    PUBLISHED_FILE,
    Action,
    Plan,
    PlannedStage,
    length_change,
    plan_next_stage,
    publication,
    stage_graph,
)
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
    answer_tokens: float | None = None  # this iteration's model on the win-rate prompts (evaluate)
    sampled_tokens: float | None = None  # this iteration's generate stage: the previous iteration's model
    length_change: float | None = None  # answer_tokens against the SFT model's, as a fraction
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
        if s.stage == contract.GENERATE:
            responses = sum(m.counts.get(K.RESPONSES, 0) for m in manifests)
            if responses and all(K.GENERATED_TOKENS in m.counts for m in manifests):
                row.sampled_tokens = sum(m.counts[K.GENERATED_TOKENS] for m in manifests) / responses
        elif s.stage == contract.JUDGE:
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
            row.answer_tokens, row.length_change = m.get(K.EVAL_ANSWER_TOKENS), length_change(m)
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
    "win_rate": ("win rate %", "The judge's mean probability of preferring the model's answer to the reference's "
                 "(alpaca_eval's win rate: each prompt judged in both answer orders, the two probabilities "
                 "averaged), in percent, ± its standard error; optional (evaluation.winRate)."),
    "lc_win_rate": ("LC win rate %", "Length-controlled win rate (the win rate had both answers been of equal "
                    "length), ± its standard error; which GLM, and whether it compares with the AlpacaEval "
                    "leaderboard, is said above the table."),
    "answer_tokens": ("answer tokens", "Mean length in tokens of this iteration's model's answers to the win-rate "
                      "prompts (evaluate), with the change against the SFT model's answers to the same prompts "
                      "(what gate.maxLengthChange bounds)."),
    "sampled_tokens": ("sampled tokens", "Mean length in tokens of the answers this iteration's generate stage "
                       "sampled for training: the previous iteration's model (the seed model in iteration 1)."),
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
    if key in ("win_rate", "lc_win_rate", "answer_tokens", "sampled_tokens"):
        return f"{value:.1f}"
    return f"{value:.4f}"


def _cell_of(row: IterationSummary, key: str) -> str:
    text = _cell(getattr(row, key), key)
    se = getattr(row, f"{key}_se", None)
    if key == "answer_tokens" and row.length_change is not None and text != "-":
        return f"{text} ({row.length_change:+.0%})"
    return f"{text} ± {se:.1f}" if se is not None and text != "-" else text


def shown_columns(rows: list[IterationSummary]) -> list[str]:
    """The columns with a figure in some row (a run without a win rate shows no win-rate columns)."""
    return [key for key in COLUMNS if key in ("iteration", "wall_s") or any(getattr(r, key) is not None
                                                                            for r in rows)]


def table_rows(rows: list[IterationSummary], keys: list[str] | None = None) -> list[list[str]]:
    return [[_cell_of(r, key) for key in (keys or list(COLUMNS))] for r in rows]


def lc_label(run: AlignmentRun) -> str | None:
    """What the LC win rate is, for the table's readers; None without a win rate."""
    win = run.spec.evaluation.win_rate if run.spec.evaluation else None
    if win is None:
        return None
    if win.length_control == "alpacaEvalV1":
        return ("LC win rate: alpaca_eval's length_controlled_v1 (the AlpacaEval 2.0 leaderboard's GLM) on its 805 "
                f"instructions, judged by {win.judge.model} with alpaca_eval's weighted_alpaca_eval_gpt4_turbo "
                "template; comparable with the leaderboard only with its judge (GPT-4 Turbo) and reference answers")
    return "LC win rate: LC (minimal GLM), not comparable with the leaderboard"


def published_line(plan: Plan) -> str:
    """The published model and why, as the console, report.md and status.outputs say it."""
    if plan.action is not Action.DONE:
        return "The run has not finished: no model is published yet; figures of missing stages are `-`."
    return (f"Published model (iteration {plan.published_iteration}): `{plan.final_model}`. Why: {plan.reason}. "
            f"Also in `{PUBLISHED_FILE}`.")


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


def _markdown(run: AlignmentRun, root: str, rows: list[IterationSummary], plan: Plan) -> str:
    keys = shown_columns(rows)
    head = [COLUMNS[k][0] for k in keys]
    label = lc_label(run)
    lines = [f"# {run.metadata.name}: per-iteration results", "", f"Run root: `{root}`", "", published_line(plan),
             *(["", label] if label else []), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows, keys)]
    lines += ["", "![per-iteration figures](report.svg)", "", "## Columns", ""]
    lines += [f"- **{COLUMNS[k][0]}**: {COLUMNS[k][1]}" for k in keys]
    return "\n".join(lines) + "\n"


def current_plan(run: AlignmentRun, root: str) -> Plan:
    """The planner's verdict on what storage holds: DONE with the published model and why, or not finished."""
    from spa_operator.local import finished_results

    graph = stage_graph(run.spec, root)
    return plan_next_stage(run.spec, root, finished_results(graph), graph)


def write_report(run: AlignmentRun, root: str, plan: Plan | None = None) -> list[str]:
    """Write report.md, report.json and report.svg into the run root, and PUBLISHED.json when the run is done (the
    planner's verdict, `plan` or read from storage; a marker left by an earlier finish is removed while the run is
    not done); returns the report's URIs."""
    plan = plan if plan is not None else current_plan(run, root)
    graph = stage_graph(run.spec, root)
    rows = summarize(graph)
    cost = cost_report.read(graph, rows)
    done = plan.action is Action.DONE
    published = publication(plan) if done else None
    doc = {"run": run.metadata.name, "namespace": run.metadata.namespace, "root": root,
           "final_model": plan.final_model if done else None, "published": published, "lc_label": lc_label(run),
           "columns": {key: text for key, (_, text) in COLUMNS.items()},
           "iterations": [dataclasses.asdict(r) for r in rows], "cost": cost.to_json()}
    contents = (_markdown(run, root, rows, plan) + cost.markdown(), contract.dumps(doc, indent=2) + "\n", _svg(rows))
    uris = [storage.join(root, name) for name in REPORT_FILES]
    for uri, text in zip(uris, contents, strict=True):
        storage.write_text(uri, text)
    marker = storage.join(root, PUBLISHED_FILE)
    if published is not None:
        storage.write_text(marker, contract.dumps(published, indent=2) + "\n")
    elif storage.exists(marker):
        storage.delete_tree(marker)
    return uris
