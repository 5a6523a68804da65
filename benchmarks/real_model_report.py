"""Render benchmarks/results/real-model.json (written by `real_model.py --full`) as real-model.md and
docs/real-model.png. `python benchmarks/real_model.py --report` re-renders without re-running."""

from __future__ import annotations

from pathlib import Path

from benchlib import ledger_columns

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"

# The paper's Table 1 (Mistral-7B, AlpacaEval 2.0 length-controlled win rate vs GPT-4, %): the same conditions
PAPER = {"sft": "7.58", "dpo-seed": "9.03", "dpo-all": "11.75", "spa-3": "15.39"}


def rows_of(data: dict) -> list[tuple[str, str, str, dict]]:
    """(key, label, gold-label share, metrics) in table order."""
    info, conds = data["info"], data["conditions"]
    seed_share = f"{100 * info['seed_fraction']:.1f}%"
    out = [("sft", "SFT", "0%", conds["sft"]["0"]),
           ("dpo-seed", "DPO on the seed", seed_share, conds["dpo-seed"]["0"]),
           ("dpo-all", "DPO on 100% of the labels", "100%", conds["dpo-all"]["0"])]
    for it, row in sorted(conds.get("spa", {}).items(), key=lambda kv: int(kv[0])):
        out.append((f"spa-{it}", f"SPA iteration {it}", seed_share, row))
    for it, row in conds.get("spa-gate", {}).items():
        out.append(("spa-gate", f"SPA with the gate (publishes iteration {it}'s model)", seed_share, row))
    return out


def pm(row: dict, key: str) -> str:
    return f"{row[key]:.3f} ± {row[key + '_se']:.3f}"


def agreement(row: dict) -> str:
    ev = row.get("evaluate")
    v = ev and ev["metrics"].get("heldout_agreement")
    return f"{v:.2f}" if v is not None else "–"


def judged(row: dict) -> str:
    jg = row.get("judge_vs_gold")
    return f"{jg['right']:.2f} / {jg['tie']:.2f} / {jg['wrong']:.2f}" if jg else "–"


def table(data: dict) -> str:
    rows = rows_of(data)
    unit = max((ledger_columns([row])[2] for *_, row in rows), key=lambda u: u == "GPU-hours")
    lines = ["| method | gold labels | labels used (ledger) | " + unit + " (ledger) | mean gold score | IFEval "
             "prompt-level strict | IFEval instruction-level strict | win rate vs SFT | judge's held-out agreement "
             "| judge's pairs right / tie / wrong by gold | paper (AlpacaEval 2.0 LC) |", "|" + " --- |" * 11]
    for key, label, share, row in rows:
        labels, hours, _ = ledger_columns([row])
        lines.append(f"| {label} | {share} | {labels} | {hours} | {pm(row, 'gold')} | {pm(row, 'prompt_strict')} | "
                     f"{pm(row, 'instruction_strict')} | {pm(row, 'win_rate')} | {agreement(row)} | {judged(row)} | "
                     f"{PAPER.get(key, '')} |")
    return "\n".join(lines)


def render(data: dict) -> None:
    c, info = data["config"], data["info"]
    rates = ", ".join(f"{k.split(':')[1]} {v:.2f}" for k, v in sorted(info["sft_instruction_rates"].items()))
    md = f"""# SPA on a real model: SmolLM2-135M-Instruct, judged by IFEval's checkers

Written by `python benchmarks/real_model.py --full` ({data['elapsed_s'] / 60:.0f} min on this machine). Every model
is trained by `spa run` from an AlignmentRun manifest; answers are sampled by `spa-worker generate` and scored by
IFEval's own instruction checkers (the `if-verifiable` package). ± is one standard error of the evaluation
(prompts as the units), one seed.

{table(data)}

Labels used and hours come from the runs' stage ledgers: the gold pairs the run read (seed and held-out, counted
once by its validate stage) and the compute of every stage up to that model (CPU time on this machine; GPU-hours,
requested GPUs x wall time, where stages held GPUs), stages copied from another run included; the SFT model is given.
Win rate: each answer against the SFT model's answer (a separate sample) to the same prompt, by gold score, ties ½.
Gold score: the fraction of the prompt's instructions an answer follows (IFEval strict). The paper's column is its
Mistral-7B result on a different benchmark, for the shape of the comparison only (its SPA row is iteration 3).

## Settings

- Data: {info['all_pairs']} gold pairs from {c['pool_prompts']} pool prompts (the SFT model's two answers differ
  in gold score on {100 * info['pool_pairs_differ']:.0f}% of them); seed {info['seed_pairs']} pairs
  ({100 * info['seed_fraction']:.1f}%); {info['iteration_prompts']} unlabelled iteration prompts, used
  {c['prompts_per_iteration'][:c['spa_iterations']]}; {info['heldout_pairs']} held-out gold pairs;
  {info['eval_prompts']} evaluation prompts × {c['eval_samples']} answers.
- Sampling: temperature {c['temperature']} (evaluation) and {c['iteration_temperature']} (iterations), at most
  {c['max_new_tokens']} new tokens.
- Training: LoRA r {c['lora_r']} / alpha {c['lora_alpha']}, learning rate {c['learning_rate']}, β {c['beta']},
  batch {c['batch_size']}, seed epochs {c['seed_epochs']}, max length {c['max_length']}.
- Quality gate: {data['gate'] or 'not run (the spec had no gate)'}.
- Instructions dropped (the SFT model never followed them): {', '.join(info['dropped_instructions']) or 'none'}.
- SFT model's rate per instruction (pool and held-out answers): {rates}.
- Wall time per condition (s): {', '.join(f'{k} {v:.0f}' for k, v in data['timings'].items())}.
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real-model.md").write_text(md)
    plot(data)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(data)
    labels = [label.split(" (")[0] for _, label, _, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "win_rate", "win rate vs SFT (gold, ties ½)"),
                           (axes[1], "instruction_strict", "IFEval instruction-level strict")):
        ys = [r[key] for *_, r in rows]
        es = [r[key + "_se"] for *_, r in rows]
        ax.barh(range(len(rows)), ys, xerr=es, color=["#999" if k == "sft" else "#4a7" if k.startswith("spa")
                                                      else "#47a" for k, *_ in rows])
        ax.set_yticks(range(len(rows)), labels if ax is axes[0] else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(title)
        if key == "win_rate":
            ax.axvline(0.5, color="k", lw=0.8, ls="--")
    fig.suptitle("SmolLM2-135M-Instruct: SPA vs DPO, judged by IFEval's checkers (± 1 SE)")
    fig.tight_layout()
    DOCS.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS / "real-model.png")
