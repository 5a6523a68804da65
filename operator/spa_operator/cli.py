"""`spa plan | run | demo | report | explain | render`: the AlignmentRun pipeline on one machine, and its Kubernetes
objects.

Exit codes: 0 done; 1 a stage failed (after its retries); 2 bad input (the manifest, a data file, a model,
outputs made with other settings, unwritable storage), never worth retrying as is; 3 storage unreachable;
130 interrupted (rerunning the same command resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table
from spa_workers import aside, storage
from spa_workers.contract import (
    EXIT_BAD_INPUT,
    EXIT_STORAGE,
    JUDGE_API_KEY_ENV,
    StageInputError,
    StageRetryableError,
)
from spa_workers.storage import StorageError

from spa_operator import cost_report, inputs, local, rerun, warm
from spa_operator.inputs import is_local_path as _is_local_path
from spa_operator.planner import PUBLISHED_FILE, Action, stage_graph
from spa_operator.progress import plain_or_live
from spa_operator.spec import AlignmentRun, SpecError, load_run, parse_run
from spa_operator.summary import COLUMNS, lc_label, shown_columns, summarize, table_rows, write_report

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
RUN_SNAPSHOT = "run.yaml"  # the resolved manifest, saved in the run root (what `spa report DIR` reads)

err = Console(stderr=True)
# Not a terminal (a log file, a pipe): no width to fit, so the table is never squeezed to 80 columns (unless
# COLUMNS asks for a width).
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


def say(text: str) -> None:
    """One message line on stderr, never wrapped or cut (a path at the end must survive 80 columns)."""
    print(text, file=sys.stderr, flush=True)


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
    local.apply_storage_settings(run)
    return run, local.run_root(run, storage_uri)


# ------------------------------------------------------------------------------------------------------- plan


def check_judge_key(run: AlignmentRun) -> None:
    """On one machine the judge's key comes from the environment: a run whose judge names a secretRef (a cluster
    Secret) needs SPA_JUDGE_API_KEY set, or every judgment would be refused after the GPU work."""
    win = run.spec.evaluation.win_rate if run.spec.evaluation else None
    if win and win.judge.secret_ref and not os.environ.get(JUDGE_API_KEY_ENV):
        raise StageInputError(f"spec.evaluation.winRate.judge.secretRef names a cluster Secret; here set "
                              f"{JUDGE_API_KEY_ENV} to the judge's API key")


def cmd_plan(args: argparse.Namespace) -> int:
    run, root = _load(args.run, args.storage)
    graph = stage_graph(run.spec, root)
    print(f"{run.metadata.name}: {len(graph)} stages under {root}")
    for s in graph:
        print(f"\n{s.key}" + (f"  (after {', '.join(s.depends_on)})" if s.depends_on else ""))
        for name, uri in s.inputs().items():
            print(f"  {name}: {uri}")
        print(f"  output: {s.output}")
        print(f"  command: spa-worker {' '.join(s.args.to_argv())}")
    problems = inputs.problems(run)
    for p in problems:
        say(f"spa plan: error: {p}")
    if problems:
        return EXIT_BAD_INPUT
    _print_expected(run, [s.stage for s in graph], args.rates_from)
    if args.check:
        from spa_workers.validate import check, check_storage_writable

        check_judge_key(run)
        counts = check(graph[0].args)  # type: ignore[arg-type]  # the validate stage, always first
        check_storage_writable(root)
        found = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())
        judge = "; the judge answers" if graph[0].args.judge_endpoint else ""  # type: ignore[attr-defined]
        say(f"spa plan: inputs OK ({found}; the model and its tokenizer load; storage is writable{judge})")
    return 0


def _print_expected(run: AlignmentRun, kinds: list[str], rates_root: str | None) -> None:
    from spa_operator import plan_cost

    rates = plan_cost.rates_from(rates_root) if rates_root else None
    print("\nexpected totals" + (f" (rates measured in {rates_root})" if rates else
                                 " (bounds; --rates-from RUN_ROOT of an earlier run of the model gives estimates "
                                 "and GPU-hours)"))
    for line in plan_cost.expected(run.spec, kinds, plan_cost.count_gold(run.spec), rates):
        print(f"  {line.label}: {line.value}" + (f"  ({line.note})" if line.note else ""))


# -------------------------------------------------------------------------------------------------------- run


def print_summary(run: AlignmentRun, root: str) -> None:
    """The per-iteration table, then the cost table (where the stages counted one)."""
    graph = stage_graph(run.spec, root)
    rows = summarize(graph)
    keys = shown_columns(rows)
    print_table(f"{run.metadata.name}: per-iteration results", [COLUMNS[k][0] for k in keys], table_rows(rows, keys))
    label = lc_label(run)
    if label:
        out.print(label, soft_wrap=True)
    cost = cost_report.read(graph, rows)
    if cost.total.amounts:  # (runs made before the ledger have none)
        print_table(f"{run.metadata.name}: cost (~: estimated)", *cost.table())


def print_table(title: str, headers: list[str], cells: list[list[str]]) -> None:
    """A table that, wider than the terminal, is printed in parts (each repeating the first column) rather than
    folding a number across lines."""
    widths = [max([len(h) if " " not in h else max(map(len, h.split())), *(len(r[j]) for r in cells)])
              for j, h in enumerate(headers)]
    parts: list[list[int]] = [[0]]
    for j in range(1, len(headers)):
        if sum(widths[c] + 3 for c in [*parts[-1], j]) + 1 > out.width and len(parts[-1]) > 1:
            parts.append([0])
        parts[-1].append(j)
    for n, part in enumerate(parts):
        table = Table(title=title + (f" ({n + 1}/{len(parts)})" if len(parts) > 1 else ""))
        for j in part:  # fixed widths: headers wrap at their words, cells never wrap
            table.add_column("\n".join(textwrap.wrap(headers[j], widths[j])), justify="right", width=widths[j],
                             no_wrap=True)
        for row in cells:
            table.add_row(*(row[j] for j in part))
        out.print(table)


def _stale_error(root: str, statuses: dict[str, local.StageStatus], prog: str, hint: str = "") -> None:
    stale = [st for st in statuses.values() if st.check is local.StageCheck.STALE]
    roots = [st for st in stale if not st.follows]
    for st in roots:
        say(f"{prog}: error: {st.key} in {root} was made with other settings: {st.change}")
    if len(stale) > len(roots):
        say(f"{prog}: error: {len(stale) - len(roots)} stage(s) after {'it' if len(roots) == 1 else 'them'} took "
            "their outputs: "
            + ", ".join(st.key for st in stale if st.follows))
    first = (roots or stale)[0].key
    say(f"{prog}: to redo them here, rerun with --rerun-from {first} (that stage and every one after it) "
        f"or --force (only the stale ones); to keep the old results, use another --storage folder")
    if hint:
        say(hint)


def _prepare_outputs(run: AlignmentRun, root: str, rerun_from: str | None = None, force: bool = False,
                     prog: str = "spa run", stale_hint: str = "") -> bool:
    """Check the inputs, then apply --rerun-from / --force: False (after saying why) on a missing or unreadable
    input, or when outputs made with other settings remain. Nothing is set aside before the inputs have passed the
    validate stage's checks, and what is set aside is listed first (rerun.py)."""
    if rerun_from and force:
        raise StageInputError("--rerun-from and --force do not go together: --rerun-from redoes a stage and every "
                              "one after it, --force only the stages made with other settings; give one")
    graph = stage_graph(run.spec, root)
    keys = [s.key for s in graph]
    if rerun_from and rerun_from not in keys:
        raise StageInputError(f"--rerun-from: no stage {rerun_from!r} in this run (stages: {', '.join(keys)})")
    problems = inputs.problems(run, remote=True)
    for p in problems:
        say(f"{prog}: error: {p}")
    if problems:
        return False
    statuses = local.check_stages(graph)
    decision = rerun.decide(graph, statuses, rerun_from, force)
    if decision.set_aside or decision.refused:  # inputs changed, or outputs are to go: only after they parse
        inputs.check_parse(run, graph[0].args, root)  # type: ignore[arg-type]  # validate, always first
    if decision.refused:
        _stale_error(root, statuses, prog, stale_hint)
        return False
    listed = rerun.present(graph, decision.set_aside)
    if listed:
        say(f"{prog}: setting aside the outputs of " + ", ".join(f"{k} ({n} files)" for k, n in listed)
            + f": each moves to {aside.DISCARDED}/<time>/ in its iteration folder, deleted once its stage succeeds "
            "again")
        for moved in rerun.move(graph, listed):
            say(f"{prog}: {moved.key} -> {moved.to}")
    return True


def _report_set_aside(graph: list, prog: str) -> None:
    """After a run: the set-aside outputs whose replacement has not succeeded (the others are deleted now)."""
    kept = rerun.settle(graph)
    if kept:
        say(f"{prog}: kept the old outputs of {', '.join(k.key for k in kept)} (their stage has not succeeded "
            f"again): {', '.join(k.to for k in kept)}; move one back in place of its stage folder to restore it")


def _save_snapshot(run: AlignmentRun, root: str) -> None:
    doc = run.model_dump(mode="json", by_alias=True, exclude_none=True)
    storage.write_text(storage.join(root, RUN_SNAPSHOT), yaml.safe_dump(doc, sort_keys=False))


def execute_and_report(run: AlignmentRun, root: str, logs: Path, processes: int | None = None,
                       cold: bool = False, server: warm.WarmServer | None = None) -> int:
    t0 = time.time()
    with plain_or_live(err, stage_graph(run.spec, root)) as progress:
        outcome = local.execute(run, root, logs, progress.on_start, progress.on_progress, progress.on_finish,
                                processes=processes, cold=warm.cold_requested(cold), server=server)
    reports = write_report(run, root, outcome.plan)
    if outcome.plan.action is Action.DONE:
        print_summary(run, root)
        print(outcome.plan.reason)
        print(f"final model: {outcome.plan.final_model}")
        print(f"published: iteration {outcome.plan.published_iteration}, {storage.join(root, PUBLISHED_FILE)}")
        print(f"report: {reports[0]} ({time.time() - t0:.1f}s)")
        return 0
    say(f"spa run: run {run.metadata.name} failed: {outcome.plan.reason}")
    say(f"spa run: report so far: {reports[0]}; fix the cause and rerun the same command to resume")
    return EXIT_BAD_INPUT if outcome.permanent else EXIT_FAILED


def _logs_dir(root: str, override: str | None) -> Path:
    if override:
        return Path(override)
    return Path(root) / "logs" if _is_local_path(root) else Path("spa-logs") / Path(root.split("://", 1)[1])


def cmd_run(args: argparse.Namespace) -> int:
    run, root = _load(args.run, args.storage)
    check_judge_key(run)
    if not _prepare_outputs(run, root, args.rerun_from, args.force):
        return EXIT_BAD_INPUT
    _save_snapshot(run, root)
    try:
        return execute_and_report(run, root, _logs_dir(root, args.logs), args.processes, args.cold)
    finally:
        _report_set_aside(stage_graph(run.spec, root), "spa run")


def cmd_render(args: argparse.Namespace) -> int:
    from spa_operator import render

    run = render.cluster_run(args.run, args.storage)
    try:
        settings = render.settings(args.pod_defaults, args.gang_scheduler)
    except (OSError, ValueError) as e:
        say(f"spa render: {e}")
        return EXIT_BAD_INPUT
    for warning in render.local_path_warnings(run):
        say(f"spa render: warning: {warning}")
    sys.stdout.write(render.render(run, args.worker_image, args.service_account, settings))
    return 0


# ------------------------------------------------------------------------------------------------------- demo


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
    server = None
    if manifest.exists():
        backend = load_run(manifest).spec.generation.backend
        if args.backend and args.backend != backend:
            say(f"spa demo: error: {base} holds a demo made with --backend {backend}; use another --out folder "
                f"for --backend {args.backend}")
            return EXIT_BAD_INPUT
        say(f"spa demo: reusing the example and run in {base} (backend {backend}); finished stages are skipped")
    else:
        say(f"spa demo: building the tiny example (random-weight Llama, BPE tokenizer, data) in {example}")
        doc = {
            "apiVersion": "spa.dev/v1alpha1", "kind": "AlignmentRun",
            "metadata": {"name": "tiny-demo", "namespace": "default"},
            "spec": {"model": {"sft": "model"},
                     "data": {"seed": "seed.jsonl", "prompts": "prompts.jsonl", "heldout": "heldout.jsonl"},
                     **DEMO_SPEC, "storage": {"uri": str(base / "runs")}},
        }
        doc["spec"]["generation"]["backend"] = args.backend or "transformers"
        if not warm.cold_requested(args.cold):  # every stage will run: the warm server imports while we build
            fresh = parse_run(doc)
            server = local.start_warm_server(fresh, local.run_root(fresh, str(base / "runs")))
        make_tiny_example(str(example))
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    say(f"spa demo: run manifest: {manifest}")
    run, root = _load(str(manifest), None)
    # the demo's manifest may have been edited by hand since its run
    if not _prepare_outputs(run, root, prog="spa demo", stale_hint=f"spa demo: those flags go to `spa run {manifest}`"):
        return EXIT_BAD_INPUT
    _save_snapshot(run, root)
    return execute_and_report(run, root, _logs_dir(root, None), cold=args.cold, server=server)


# ------------------------------------------------------------------------------------------- report, explain


def cmd_report(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir() or "://" in args.target:
        root = args.target.rstrip("/")
        snapshot = storage.join(root, RUN_SNAPSHOT)
        try:
            text = storage.read_text(snapshot)
        except FileNotFoundError:
            raise StageInputError(f"{snapshot}: not found (is {root} the root of a run made by spa run?)") from None
        run = parse_run(yaml.safe_load(text), snapshot)
        local.apply_storage_settings(run)
    else:
        run, root = _load(args.target, args.storage)
    reports = write_report(run, root)
    print_summary(run, root)
    for uri in reports:
        print(f"wrote {uri}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from spa_operator.explain import render

    print(render(args.field))
    return 0


# -------------------------------------------------------------------------------------------------------- main


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


COLD_HELP = (f"start each stage as a fresh process instead of forking it from a process that has imported the "
             f"libraries once (also: {warm.COLD_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa", description="SPA self-alignment pipeline (AlignmentRun) on one machine",
                                epilog="exit codes: 0 done, 1 a stage failed, 2 bad input, 3 storage unreachable, "
                                       "130 interrupted (rerun the same command to resume)")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="print the stage graph with each stage's inputs and outputs")
    pp.add_argument("run", help="AlignmentRun manifest (YAML)")
    pp.add_argument("--storage", help="storage root (local dir or s3://...), overrides spec.storage.uri")
    pp.add_argument("--check", action="store_true",
                    help="also run the validate stage's checks here: data rows, prompt count, model, storage")
    pp.add_argument("--rates-from", metavar="RUN_ROOT",
                    help="an earlier run of the same model (its root folder or s3:// prefix): expected tokens, "
                         "pairs, GPU-hours and CPU-hours at its measured rates")
    pp.set_defaults(fn=cmd_plan)
    pr = sub.add_parser("run", help="run the pipeline here, stages as subprocesses; finished stages are skipped")
    pr.add_argument("run", help="AlignmentRun manifest (YAML)")
    pr.add_argument("--storage", help="storage root (local dir or s3://...), overrides spec.storage.uri")
    pr.add_argument("--logs", help="folder for stage logs (default: <run root>/logs)")
    pr.add_argument("--processes", type=_at_least_one, metavar="N",
                    help="training processes (default: the stage's resources.<stage>.gpus, at least 1)")
    pr.add_argument("--rerun-from", metavar="STAGE",
                    help="discard the outputs of STAGE (e.g. iter-00/seed-train) and every stage after it first")
    pr.add_argument("--force", action="store_true",
                    help="redo stages whose outputs were made with other settings instead of stopping")
    pr.add_argument("--cold", action="store_true", help=COLD_HELP)
    pr.set_defaults(fn=cmd_run)
    pt = sub.add_parser("render", help="print every Kubernetes object the operator would create for the run "
                                       "(first attempt of each stage), as a YAML stream")
    pt.add_argument("run", help="AlignmentRun manifest (YAML)")
    pt.add_argument("--storage", help="s3://bucket/prefix, overrides spec.storage.uri")
    pt.add_argument("--worker-image", help="the operator's default worker image")
    pt.add_argument("--service-account", help="the operator's default worker service account")
    pt.add_argument("--pod-defaults", metavar="FILE",
                    help="the chart's worker pod defaults (YAML with keys all and gpu, as Helm worker.podDefaults)")
    pt.add_argument("--gang-scheduler", choices=["coscheduling", "volcano"],
                    help="the cluster's gang scheduler (Helm worker.gangScheduling.kind)")
    pt.set_defaults(fn=cmd_render)
    pd = sub.add_parser("demo", help="build the tiny offline example and run seed DPO + 2 SPA iterations")
    pd.add_argument("--out", required=True, help="folder for the example and its run")
    pd.add_argument("--backend", choices=["transformers", "vllm"], default=None,
                    help="generation backend for a new demo (default: transformers, quickest on CPU)")
    pd.add_argument("--cold", action="store_true", help=COLD_HELP)
    pd.set_defaults(fn=cmd_demo)
    prep = sub.add_parser("report", help="write report.md, report.json and report.svg for a run and print its table")
    prep.add_argument("target", help="AlignmentRun manifest (YAML) or a run root folder (holding run.yaml)")
    prep.add_argument("--storage", help="storage root, overrides spec.storage.uri (with a manifest)")
    prep.set_defaults(fn=cmd_report)
    pe = sub.add_parser("explain", help="the reference of an AlignmentRun field, e.g. spec.training.beta")
    pe.add_argument("field", nargs="?", default="spec", help="field path (default: spec)")
    pe.set_defaults(fn=cmd_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = f"spa {args.command}"
    try:
        return args.fn(args)
    except SpecError as e:
        if args.command == "explain":
            say(f"spa explain: {e}")
        else:
            say(f"spa: invalid AlignmentRun: {e}")
        return EXIT_BAD_INPUT
    except StageInputError as e:
        say(f"{name}: error: {e}")
        return EXIT_BAD_INPUT
    except StorageError as e:
        say(f"{name}: error: storage: {e}")
        return EXIT_STORAGE
    except StageRetryableError as e:  # e.g. `spa plan --check` with the judge down: worth trying again later
        say(f"{name}: error: {e}")
        return EXIT_FAILED
    except BrokenPipeError:  # `spa plan ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        say(f"{name}: error: {e.filename}: {e.strerror or e}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        say(f"{name}: interrupted; rerun the same command to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
