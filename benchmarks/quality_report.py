"""Render benchmarks/results/quality.json (written by `quality.py --full`) as quality.md, quality-spread.json and
docs/quality.png. `python benchmarks/quality.py --report` re-renders without re-running."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchlib import ledger_columns

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"

LABELS = {
    "dpo-seed": "DPO on the seed", "dpo-all": "DPO on 100% gold labels", "spa": "SPA",
    "spa-no-refinement": "SPA without self-refinement", "spa-lambda-0": "SPA, refinement with λ = 0",
    "spa-ref-previous": "SPA, judge reference = previous model",
}


def _values(data: dict, cond: str, it: int, key: str) -> list[float]:
    out = []
    for seed in data["seeds"]:
        per = data["per_seed"][str(seed)]
        if cond == "sft":
            row = per.get("sft")
        else:
            row = per["conditions"].get(cond, {}).get(str(it)) or per["conditions"].get(cond, {}).get(it)
        if row and key in row:
            out.append(row[key])
    return out


def _row(data: dict, seed: int, cond: str, it: int) -> dict:
    return data["per_seed"][str(seed)]["conditions"].get(cond, {}).get(str(it)) or {}


def _agreement(data: dict, cond: str, it: int) -> list[float]:
    out = []
    for seed in data["seeds"]:
        conds = data["per_seed"][str(seed)]["conditions"]
        row = conds.get(cond, {}).get(str(it))
        if cond.startswith("spa") and it == 0:
            row = conds.get("dpo-seed", {}).get("0")  # π_0 is the same model in every SPA run
        ev = (row or {}).get("evaluate")
        if ev and "heldout_agreement" in ev["metrics"]:
            out.append(ev["metrics"]["heldout_agreement"])
    return out


def _stat(data: dict, cond: str, it: int, stage: str, kind: str, key: str) -> list[float]:
    out = []
    for seed in data["seeds"]:
        row = data["per_seed"][str(seed)]["conditions"].get(cond, {}).get(str(it)) or {}
        v = row.get(stage, {}).get(kind, {}).get(key)
        if v is not None:
            out.append(v)
    return out


def _eval_error(data: dict) -> str:
    """The evaluation's own sampling error of one model's win-rate, averaged over the scored models."""
    ses = [row["win_rate_se"] for seed in data["seeds"] for its in data["per_seed"][str(seed)]["conditions"].values()
           for row in its.values() if "win_rate_se" in row]
    if not ses:
        return ""
    return (f" The evaluation's own standard error of one model's win-rate (prompts as the independent units) is "
            f"{statistics.fmean(ses):.3f}; the seed-to-seed ± below include it.")


def gated_iteration(data: dict, seed: int, gate: dict) -> tuple[int | None, int]:
    """(iteration where the gate stops seed's `spa` run or None, iteration whose model it publishes), decided by
    the planner itself on the run's recorded evaluate figures."""
    from spa_operator.planner import StageResult, StageState, gate_verdict
    from spa_operator.spec import parse_run

    conds = data["per_seed"][str(seed)]["conditions"]
    iters = sorted(int(i) for i in conds["spa"])
    spec = parse_run({"apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun", "metadata": {"name": "gated"},
                      "spec": {"model": {"sft": "sft"}, "data": {"seed": "s", "prompts": "p", "heldout": "h"},
                               "iterations": {"count": iters[-1], "promptsPerIteration": 1}, "gate": gate}}).spec
    results = {f"iter-{i:02d}/evaluate": StageResult(StageState.SUCCEEDED, metrics=conds["spa"][str(i)].get(
        "evaluate", {}).get("metrics", {})) for i in iters}
    verdict = gate_verdict(spec, results)
    assert verdict is not None
    return (verdict.stopped_at, verdict.best_iteration or 0) if verdict.stop else (None, iters[-1])


def _gated_rows(data: dict, gate: dict) -> tuple[list[dict], list[str]]:
    """The published model's scores per seed, and one line per seed saying what the gate did."""
    rows, notes = [], []
    for seed in data["seeds"]:
        conds = data["per_seed"][str(seed)]["conditions"]
        stop, published = gated_iteration(data, seed, gate)
        rows.append(conds["dpo-seed"]["0"] if published == 0 else conds["spa"][str(published)])
        notes.append(f"seed {seed}: " + ("ran to the end" if stop is None else
                                         f"stopped after iteration {stop}, published iteration {published}"))
    return rows, notes


def _cost_of_rows(rows: list[dict]) -> str:
    if not any("cost" in r for r in rows):
        return "– | –"
    labels, hours, _ = ledger_columns(rows)
    return f"{labels} | {hours}"


def _cost(data: dict, cond: str, it: int) -> str:
    """The labels-used and CPU-hours cells of a condition's iteration (its seeds' ledgers)."""
    if cond == "sft":
        return "0 | 0"
    rows = [r for seed in data["seeds"] if (r := _row(data, seed, cond, it))]
    return _cost_of_rows(rows)


def ms(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {sd:.{digits}f}"


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def render(data: dict) -> str:
    seeds = data["seeds"]
    per = data["per_seed"]
    seed_pct = [100 * per[str(s)]["info"]["seed_pairs"] / per[str(s)]["info"]["all_pairs"] for s in seeds]
    n_seed = [per[str(s)]["info"]["seed_pairs"] for s in seeds]
    n_all = [per[str(s)]["info"]["all_pairs"] for s in seeds]
    n_held = [per[str(s)]["info"]["heldout_pairs"] for s in seeds]
    c = data["config"]
    pct = f"{statistics.fmean(seed_pct):.1f}%"
    lines = [
        "# Does SPA align? Synthetic gold-preference benchmark",
        "",
        f"`python benchmarks/quality.py --full` — {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"{data['elapsed_s'] / 60:.1f} min on this machine. Every model below was trained by `spa run` from an "
        "AlignmentRun manifest, sampled by `spa-worker generate`, and scored by the gold function. "
        "Mean ± standard deviation over seeds. Per seed, the seed-train stage runs once (in `dpo-seed`) and is "
        "copied into the SPA runs, and iteration 1's generate and judge stages are copied from `spa` into the "
        "ablations (identical commands; `spa run` skips a stage whose _SUCCESS.json exists).",
        "",
        f"Task: sort 5 digits; gold score = LCS(answer, sorted digits) / max(5, answer length). Seed: "
        f"{statistics.fmean(n_seed):.0f} gold pairs ({pct} of the {statistics.fmean(n_all):.0f} pairs DPO-100% "
        f"trains on, same prompts); SPA iterations take {c['prompts_per_iteration']} unlabelled prompts, "
        f"{c['responses_per_prompt']} answers each, temperature {c['iteration_temperature']}; learning rate "
        f"{c['learning_rate']}, β {c['beta']}, batch {c['batch_size']}, seed DPO {c['seed_epochs']} epochs, "
        f"DPO-100% {c['all_epochs']} epoch. Evaluation: {c['eval_prompts']} prompts × {c['eval_samples']} samples "
        f"(temperature {c['temperature']}) against the SFT model's samples (win = higher gold score, tie = ½). "
        "Judge agreement: "
        f"{statistics.fmean(n_held):.0f} held-out gold pairs (evaluate stage).{_eval_error(data)}",
        "",
        "## Main results (shape of the paper's Table 1)",
        "",
        "| method | gold labels | labels used (ledger) | CPU-hours (ledger) | win-rate vs SFT | mean gold score | "
        "exact answers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| SFT | 0% | {_cost(data, 'sft', 0)} | {ms(_values(data, 'sft', 0, 'win_rate'))} | "
        f"{ms(_values(data, 'sft', 0, 'gold'))} | {ms(_values(data, 'sft', 0, 'exact'))} |",
        f"| DPO on the seed | {pct} | {_cost(data, 'dpo-seed', 0)} | {ms(_values(data, 'dpo-seed', 0, 'win_rate'))} | "
        f"{ms(_values(data, 'dpo-seed', 0, 'gold'))} | {ms(_values(data, 'dpo-seed', 0, 'exact'))} |",
        f"| DPO on 100% gold labels | 100% | {_cost(data, 'dpo-all', 0)} | "
        f"{ms(_values(data, 'dpo-all', 0, 'win_rate'))} | {ms(_values(data, 'dpo-all', 0, 'gold'))} | "
        f"{ms(_values(data, 'dpo-all', 0, 'exact'))} |",
    ]
    for it in (1, 2, 3):
        lines.append(f"| SPA iteration {it} | {pct} | {_cost(data, 'spa', it)} | "
                     f"{ms(_values(data, 'spa', it, 'win_rate'))} | {ms(_values(data, 'spa', it, 'gold'))} | "
                     f"{ms(_values(data, 'spa', it, 'exact'))} |")
    gate = c.get("gate")
    if gate:
        rows, notes = _gated_rows(data, gate)
        rule = ", ".join(f"{k} {v}" for k, v in gate.items() if k != "metric")
        lines.append(f"| SPA with the gate ({gate['metric']}, {rule}) | {pct} | {_cost_of_rows(rows)} | "
                     + " | ".join(ms([r[k] for r in rows]) for k in ("win_rate", "gold", "exact")) + " |")
        lines += ["", f"SPA with the gate: spec.gate = {json.dumps(gate)} applied by the planner to each seed's "
                  "`spa` run (its stages are the gated run's up to where the gate stops it): "
                  + "; ".join(notes) + "."]
    lines += ["", "Labels used and CPU-hours come from the runs' stage ledgers (mean over seeds): the gold pairs a "
              "run read (seed and held-out, counted once by its validate stage) and the CPU time of every stage "
              "up to that model (seed-train and evaluate included, stages copied from another run too; the "
              "SFT model and the benchmark's own sampling and scoring are not counted). `–`: results from before "
              "the ledger."]
    lines += [
        "",
        "## Ablations (shape of the paper's Tables 6 and 7): win-rate vs SFT per iteration",
        "",
        f"The ablations run {c.get('ablation_iterations', 3)} iterations (to keep `--full` within 30 min on 2 "
        "cores); iteration 1 of all four is the same judged data.",
        "",
        "| method | refinement | λ | judge reference | iteration 1 | iteration 2 | iteration 3 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    variants = [("spa-no-refinement", "no", "–", "π_init"), ("spa-lambda-0", "yes", "0", "π_init"),
                ("spa", "yes", "1/2^i", "π_init"), ("spa-ref-previous", "yes", "1/2^i", "π_{i-1}")]
    for cond, ref, lam, judge in variants:
        cells = " | ".join(ms(_values(data, cond, it, "win_rate")) for it in (1, 2, 3))
        lines.append(f"| {LABELS[cond]} | {ref} | {lam} | {judge} | {cells} |")
    lines += [
        "",
        "## The judge: held-out agreement with gold, per iteration",
        "",
        "Agreement of π_i's implicit reward β·(log π_i − log π_init) with the gold label on held-out pairs (the "
        "evaluate stage); π_i is the judge of iteration i+1 (for `judge reference = previous` its judge uses "
        "π_{i-1} as reference instead, which this column does not measure). Then the judge stage of iteration i: "
        "pairs kept, mean reward gap r_w − r_l, and the train stage's refined fraction.",
        "",
        "| method | π_0 | π_1 | π_2 | π_3 | pairs (it. 1/2/3) | reward gap (it. 1/2/3) | refined (it. 1/2/3) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cond in ("spa", "spa-no-refinement", "spa-lambda-0", "spa-ref-previous"):
        agree = " | ".join(ms(_agreement(data, cond, it), 2) for it in range(4))
        pairs = " / ".join(f"{statistics.fmean(v):.0f}" if (v := _stat(data, cond, it, "judge", "counts", "pairs"))
                           else "–" for it in (1, 2, 3))
        gap = " / ".join(f"{statistics.fmean(v):.3f}" if (v := _stat(
            data, cond, it, "judge", "metrics", "reward_gap_mean")) else "–" for it in (1, 2, 3))
        ref = " / ".join(f"{statistics.fmean(v):.2f}" if (v := _stat(
            data, cond, it, "train", "metrics", "refined_fraction")) else "–" for it in (1, 2, 3))
        lines.append(f"| {LABELS[cond]} | {agree} | {pairs} | {gap} | {ref} |")
    lines += [
        "",
        "## What the judge's pairs are, under the gold score",
        "",
        "Per iteration: the fraction of the judge's (chosen, rejected) pairs where the chosen answer has the higher "
        "gold score (right), the same (tie) or the lower (wrong), and how often the chosen answer does not use "
        "exactly the prompt's digits. Then the fraction of sampled evaluation answers with wrong digits.",
        "",
        "| method | iteration 1 right / tie / wrong | iteration 2 | iteration 3 | chosen with wrong digits (1/2/3) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cond in ("spa", "spa-no-refinement", "spa-lambda-0", "spa-ref-previous"):
        cells = []
        for it in (1, 2, 3):
            rows = [r for r in (_row(data, s, cond, it).get("judge_vs_gold") for s in seeds) if r]
            cells.append(" / ".join(f"{statistics.fmean(r[k] for r in rows):.2f}" for k in ("right", "tie", "wrong"))
                         if rows else "–")
        wd = " / ".join(f"{statistics.fmean(v):.2f}" if (v := [r["chosen_wrong_digits"] for r in (
            _row(data, s, cond, it).get("judge_vs_gold") for s in seeds) if r]) else "–" for it in (1, 2, 3))
        lines.append(f"| {LABELS[cond]} | {' | '.join(cells)} | {wd} |")
    lines += ["", "| model | answers with wrong digits |", "| --- | --- |",
              f"| SFT | {ms(_values(data, 'sft', 0, 'wrong_digits'))} |",
              f"| DPO on the seed | {ms(_values(data, 'dpo-seed', 0, 'wrong_digits'))} |",
              f"| DPO on 100% gold labels | {ms(_values(data, 'dpo-all', 0, 'wrong_digits'))} |"]
    for cond in ("spa", "spa-no-refinement", "spa-lambda-0", "spa-ref-previous"):
        for it in (1, 2, 3):
            if _values(data, cond, it, "wrong_digits"):
                lines.append(f"| {LABELS[cond]}, iteration {it} | {ms(_values(data, cond, it, 'wrong_digits'))} |")
    dpo_all_agree = _agreement(data, "dpo-all", 0)
    if dpo_all_agree:
        lines += ["", f"For comparison, DPO on 100% gold labels: held-out agreement {ms(dpo_all_agree, 2)}."]
    lines += ["", "## Per seed (win-rate vs SFT)", "",
              "| seed | SFT | DPO seed | DPO 100% | SPA 1 | SPA 2 | SPA 3 | no refinement 2 | λ = 0 2 "
              "| ref previous 2 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in seeds:
        p = per[str(s)]
        cond = p["conditions"]

        def w(name: str, it: int, cond=cond) -> str:
            row = cond.get(name, {}).get(str(it))
            return f"{row['win_rate']:.3f}" if row else "–"

        sft = f"{p['sft']['win_rate']:.3f}" if p.get("sft") else "–"
        lines.append(f"| {s} | {sft} | {w('dpo-seed', 0)} | {w('dpo-all', 0)} | {w('spa', 1)} | {w('spa', 2)} | "
                     f"{w('spa', 3)} | {w('spa-no-refinement', 2)} | {w('spa-lambda-0', 2)} | "
                     f"{w('spa-ref-previous', 2)} |")
    timings = {}
    for s in seeds:
        for k, v in per[str(s)]["timings"].items():
            timings.setdefault(k, []).append(v)
    lines += ["", "Wall time of `spa run` per condition (s, mean over seeds, two conditions at a time on 2 shared "
              "cores): " + ", ".join(f"{k} {statistics.fmean(v):.0f}" for k, v in timings.items()) + "."]
    text = "\n".join(lines) + "\n"
    notes = RESULTS / "quality-notes.md"
    if notes.exists():
        text += "\n" + notes.read_text()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text(text)
    spa2, dseed = _values(data, "spa", 2, "win_rate"), _values(data, "dpo-seed", 0, "win_rate")
    diffs = [a - b for a, b in zip(spa2, dseed, strict=False)] if len(spa2) == len(dseed) else []
    spread = {
        "seeds": seeds,
        "spa_iter2_win_rate_mean": statistics.fmean(spa2) if spa2 else None, "spa_iter2_win_rate_sd": sd(spa2),
        "dpo_seed_win_rate_mean": statistics.fmean(dseed) if dseed else None, "dpo_seed_win_rate_sd": sd(dseed),
        "difference_mean": statistics.fmean(diffs) if diffs else None, "difference_sd": sd(diffs),
        # the margin tests/test_quality.py requires: the larger seed-to-seed sd of the two conditions
        "spread": max(sd(spa2), sd(dseed)),
    }
    (RESULTS / "quality-spread.json").write_text(json.dumps(spread, indent=1) + "\n")
    plot(data)
    print(text)
    return text


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    its = [0, 1, 2, 3]
    dseed = _values(data, "dpo-seed", 0, "win_rate")
    styles = {"spa": ("C0", "o", "-"), "spa-no-refinement": ("C1", "s", "--"), "spa-lambda-0": ("C2", "^", "--"),
              "spa-ref-previous": ("C3", "v", ":")}
    for cond, (color, marker, ls) in styles.items():
        xs, means, sds = [], [], []
        for it in its:
            v = dseed if it == 0 else _values(data, cond, it, "win_rate")
            if v:
                xs.append(it + 0.03 * list(styles).index(cond))
                means.append(statistics.fmean(v))
                sds.append(sd(v))
        ax.errorbar(xs, means, yerr=sds, color=color, marker=marker, ls=ls, capsize=3, label=LABELS[cond])
    for cond, color, label in (("sft", "grey", "SFT"), ("dpo-all", "black", "DPO on 100% gold labels")):
        v = _values(data, cond, 0, "win_rate")
        if v:
            m = statistics.fmean(v)
            ax.axhline(m, color=color, ls="-." if cond == "dpo-all" else ":", lw=1)
            ax.axhspan(m - sd(v), m + sd(v), color=color, alpha=0.08)
            ax.text(-0.15, m + 0.003, label, va="bottom", fontsize=8, color=color)
    ax.set_xticks(its, ["π_0 (DPO on seed)", "iteration 1", "iteration 2", "iteration 3"])
    ax.set_ylabel("gold win-rate vs SFT (ties ½)")
    ax.set_title(f"SPA on the digit-sorting task, {len(data['seeds'])} seeds (mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_xlim(-0.2, 3.9)
    fig.tight_layout()
    DOCS.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "quality.png")
