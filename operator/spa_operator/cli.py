"""`spa plan | run | demo`: the AlignmentRun pipeline on one machine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from spa_operator import local
from spa_operator.planner import Action, PlannedStage, stage_graph
from spa_operator.spec import AlignmentRun, SpecError, load_run, parse_run
from spa_operator.summary import summarize

err = Console(stderr=True)
out = Console()


def _is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def localize(run: AlignmentRun, base: Path) -> AlignmentRun:
    """Resolve relative local paths in the spec against the manifest's folder (URIs are left alone)."""
    doc = run.model_dump(by_alias=True, exclude_none=True)
    spec = doc["spec"]

    def fix(section: dict | None, key: str) -> None:
        value = (section or {}).get(key)
        if value and _is_local_path(value) and not os.path.isabs(value):
            section[key] = str((base / value).resolve())  # type: ignore[index]

    fix(spec.get("model"), "sft")
    for key in ("seed", "prompts", "heldout"):
        fix(spec.get("data"), key)
    for key in ("prompts", "referenceAnswers", "referenceModel"):
        fix(spec.get("evaluation", {}).get("winRate"), key)
    fix(spec.get("storage"), "uri")
    return parse_run(doc)


def _load(path: str, storage_override: str | None) -> tuple[AlignmentRun, str]:
    run = localize(load_run(path), Path(path).resolve().parent)
    storage_uri = storage_override or (run.spec.storage.uri if run.spec.storage else None)
    if not storage_uri:
        raise SpecError("spec.storage.uri", "required (or pass --storage DIR)", path)
    if _is_local_path(storage_uri):
        storage_uri = str(Path(storage_uri).resolve())
    return run, local.run_root(run, storage_uri)


def cmd_plan(args: argparse.Namespace) -> int:
    run, root = _load(args.run, args.storage)
    table = Table(title=f"{run.metadata.name}: {root}", show_lines=True)
    for col in ("stage", "after", "inputs", "output", "command"):
        table.add_column(col, overflow="fold")
    for s in stage_graph(run.spec, root):
        inputs = "\n".join(f"{k}: {v}" for k, v in s.inputs().items())
        table.add_row(s.key, ", ".join(s.depends_on), inputs, s.output, "spa-worker " + " ".join(s.args.to_argv()))
    out.print(table)
    return 0


def _fmt(value: float | int | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None, se: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ± {se:.1f}" if se is not None else f"{value:.1f}"


def print_summary(run: AlignmentRun, root: str) -> None:
    table = Table(title=f"{run.metadata.name}: per-iteration results")
    win = bool(run.spec.evaluation and run.spec.evaluation.win_rate)
    cols = ["iteration", "pairs", "reward gap", "refined", "held-out agreement"]
    cols += ["win rate %", "LC win rate %"] if win else []
    for col in (*cols, "DPO loss", "wall time"):
        table.add_column(col, justify="right")
    for row in summarize(stage_graph(run.spec, root)):
        cells = ["seed" if row.iteration == 0 else str(row.iteration), _fmt(row.pairs, "d"),
                 _fmt(row.reward_gap, ".4f"), _fmt(row.refined_fraction, ".2f"), _fmt(row.heldout_agreement, ".3f")]
        cells += [_pct(row.win_rate, row.win_rate_se), _pct(row.lc_win_rate, row.lc_win_rate_se)] if win else []
        table.add_row(*cells, _fmt(row.loss, ".4f"), f"{row.wall_s:.1f}s")
    out.print(table)


def execute_with_progress(run: AlignmentRun, root: str, logs: Path) -> int:
    tasks: dict[str, TaskID] = {}
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=err,
                  transient=False) as progress:

        def on_start(stage: PlannedStage, attempt: int) -> None:
            label = stage.key + (f" (attempt {attempt})" if attempt > 1 else "")
            tasks[stage.key] = progress.add_task(label, total=stage.shards, status="running")

        def on_progress(stage: PlannedStage, shard: int, fraction: float) -> None:
            progress.update(tasks[stage.key], completed=shard + fraction)

        def on_finish(result: local.StageRun) -> None:
            status = "[green]done" if result.ok else f"[red]failed (exit {result.exit_code}, log {result.log})"
            progress.update(tasks[result.key], status=status)

        plan = local.execute(run, root, logs, on_start, on_progress, on_finish)
    if plan.action is Action.DONE:
        print_summary(run, root)
        if plan.reason:
            out.print(plan.reason)
        out.print(f"final model: {plan.final_model}")
        return 0
    err.print(f"[red]run {run.metadata.name} failed:[/red] {plan.reason}")
    return 1


def _logs_dir(root: str, override: str | None) -> Path:
    if override:
        return Path(override)
    return Path(root) / "logs" if _is_local_path(root) else Path("spa-logs") / Path(root.split("://", 1)[1])


def cmd_run(args: argparse.Namespace) -> int:
    run, root = _load(args.run, args.storage)
    return execute_with_progress(run, root, _logs_dir(root, args.logs))


DEMO_SPEC = {
    "iterations": {"count": 2, "promptsPerIteration": [32, 32]},
    "generation": {"responsesPerPrompt": 2, "temperature": 1.0, "maxNewTokens": 24, "backend": "transformers"},
    "training": {"beta": 0.1, "learningRate": 5e-5, "seedEpochs": 1, "batchSize": 8, "maxLength": 256,
                 "maxPromptLength": 128, "refinement": {"window": 16}},
}


def cmd_demo(args: argparse.Namespace) -> int:
    from spa_workers.tiny import make_tiny_example

    base = Path(args.out).resolve()
    example = base / "example"
    manifest = example / "run.yaml"
    if not manifest.exists():
        err.print(f"building the tiny example (random-weight Llama, BPE tokenizer, data) in {example}")
        make_tiny_example(str(example))
        doc = {
            "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
            "metadata": {"name": "tiny-demo", "namespace": "default"},
            "spec": {"model": {"sft": "model"},
                     "data": {"seed": "seed.jsonl", "prompts": "prompts.jsonl", "heldout": "heldout.jsonl"},
                     **DEMO_SPEC, "storage": {"uri": str(base / "runs")}},
        }
        doc["spec"]["generation"]["backend"] = args.backend
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    err.print(f"run manifest: {manifest}")
    run, root = _load(str(manifest), None)
    return execute_with_progress(run, root, _logs_dir(root, None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="SPA self-alignment pipeline (AlignmentRun) on one machine")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="print the stage graph with each stage's inputs and outputs")
    pp.add_argument("run", help="AlignmentRun manifest (YAML)")
    pp.add_argument("--storage", help="storage root (local dir or s3://...), overrides spec.storage.uri")
    pp.set_defaults(fn=cmd_plan)
    pr = sub.add_parser("run", help="run the pipeline here, stages as subprocesses; finished stages are skipped")
    pr.add_argument("run", help="AlignmentRun manifest (YAML)")
    pr.add_argument("--storage", help="storage root (local dir or s3://...), overrides spec.storage.uri")
    pr.add_argument("--logs", help="folder for stage logs (default: <run root>/logs)")
    pr.set_defaults(fn=cmd_run)
    pd = sub.add_parser("demo", help="build the tiny offline example and run seed DPO + 2 SPA iterations")
    pd.add_argument("--out", required=True, help="folder for the example and its run")
    pd.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                    help="generation backend for the demo (default: transformers, quickest on CPU)")
    pd.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        err.print(f"spa: invalid AlignmentRun: {e}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
