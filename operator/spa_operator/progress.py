"""How `spa run` shows stage progress: live bars on a terminal, plain timestamped lines otherwise.

`spa run ... > log` (or under nohup, CI, a pipe) must leave a readable log while it runs, so unless both stdout and
stderr are terminals, every event is one line on stdout, flushed at once. Failure lines are printed whole in
either mode: the log path at their end must survive a narrow terminal. After each stage both say how far the run is
and how long it has left (`eta`, from the finished stages' manifests: "unknown" until a stage of every kind still to
run has finished).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from spa_workers import contract

from spa_operator import eta, run_cost
from spa_operator.local import StageRun, last_error_line
from spa_operator.planner import PlannedStage

PLAIN_EVERY_S = 30.0  # plain mode: at most one progress line per stage this often


def _failure(result: StageRun) -> str:
    reason = last_error_line(result.log)
    return (f"{result.key}: failed (exit {result.exit_code}) after {result.seconds:.1f}s"
            + (f": {reason}" if reason else "") + f"; log: {result.log}")


class RunClock:
    """The run's ETA as `spa run` sees it: stages one after another, durations as this process saw them."""

    def __init__(self, graph: Sequence[PlannedStage]) -> None:
        self.graph = graph
        self.seconds: dict[str, float] = {}

    def finished(self, result: StageRun) -> None:
        if result.ok:
            self.seconds[result.key] = result.seconds

    def text(self) -> str:
        manifests = {s.key: found for s in self.graph if (found := contract.read_stage_manifests(s.args))}
        clocks = run_cost.clocks_from_manifests(self.graph, manifests, self.seconds)
        est = eta.estimate(clocks, parallel=False)
        left = "time left unknown" if est.remaining_s is None else f"about {eta.human(est.remaining_s)} left"
        return f"run {est.percent}% done, {left}"


class PlainProgress:
    def __init__(self, clock: RunClock | None = None) -> None:
        self.last: dict[str, float] = {}
        self.clock = clock

    @staticmethod
    def line(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    def on_start(self, stage: PlannedStage, attempt: int) -> None:
        self.last[stage.key] = time.monotonic()
        self.line(f"{stage.key}: started" + (f" (attempt {attempt})" if attempt > 1 else ""))

    def on_progress(self, stage: PlannedStage, shard: int, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last.get(stage.key, 0.0) < PLAIN_EVERY_S:
            return
        self.last[stage.key] = now
        self.line(f"{stage.key}: {100 * (shard + fraction) / stage.shards:.0f}%")

    def on_finish(self, result: StageRun) -> None:
        if self.clock is not None:
            self.clock.finished(result)
        eta_text = f" ({self.clock.text()})" if self.clock is not None and result.ok else ""
        self.line(f"{result.key}: done in {result.seconds:.1f}s{eta_text}" if result.ok else _failure(result))


class LiveProgress:
    def __init__(self, progress: Progress, clock: RunClock | None = None) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.clock = clock
        self.run_task = progress.add_task("run", total=None, status="") if clock is not None else None

    def on_start(self, stage: PlannedStage, attempt: int) -> None:
        label = stage.key + (f" (attempt {attempt})" if attempt > 1 else "")
        self.tasks[stage.key] = self.progress.add_task(label, total=stage.shards, status="running")

    def on_progress(self, stage: PlannedStage, shard: int, fraction: float) -> None:
        self.progress.update(self.tasks[stage.key], completed=shard + fraction)

    def on_finish(self, result: StageRun) -> None:
        status = "[green]done" if result.ok else f"[red]failed (exit {result.exit_code})"
        self.progress.update(self.tasks[result.key], status=status)
        if self.clock is not None and self.run_task is not None:
            self.clock.finished(result)
            self.progress.update(self.run_task, status=self.clock.text())
        if not result.ok:
            self.progress.console.print(_failure(result), soft_wrap=True, markup=False, highlight=False)


@contextlib.contextmanager
def plain_or_live(console: Console, graph: Sequence[PlannedStage] = ()) -> Iterator[PlainProgress | LiveProgress]:
    """`graph`: the run's stages, for the ETA after each stage (none without it)."""
    clock = RunClock(graph) if graph else None
    if not (sys.stdout.isatty() and console.is_terminal):
        yield PlainProgress(clock)
        return
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                  transient=False) as progress:
        yield LiveProgress(progress, clock)
