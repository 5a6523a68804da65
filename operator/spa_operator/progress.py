"""How `spa run` shows stage progress: live bars on a terminal, plain timestamped lines otherwise.

`spa run ... > log` (or under nohup, CI, a pipe) must leave a readable log while it runs, so unless both stdout and
stderr are terminals, every event is one line on stdout, flushed at once. Failure lines are printed whole in
either mode: the log path at their end must survive a narrow terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from spa_operator.local import StageRun, last_error_line
from spa_operator.planner import PlannedStage

PLAIN_EVERY_S = 30.0  # plain mode: at most one progress line per stage this often


def _failure(result: StageRun) -> str:
    reason = last_error_line(result.log)
    return (f"{result.key}: failed (exit {result.exit_code}) after {result.seconds:.1f}s"
            + (f": {reason}" if reason else "") + f"; log: {result.log}")


class PlainProgress:
    def __init__(self) -> None:
        self.last: dict[str, float] = {}

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
        self.line(f"{result.key}: done in {result.seconds:.1f}s" if result.ok else _failure(result))


class LiveProgress:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def on_start(self, stage: PlannedStage, attempt: int) -> None:
        label = stage.key + (f" (attempt {attempt})" if attempt > 1 else "")
        self.tasks[stage.key] = self.progress.add_task(label, total=stage.shards, status="running")

    def on_progress(self, stage: PlannedStage, shard: int, fraction: float) -> None:
        self.progress.update(self.tasks[stage.key], completed=shard + fraction)

    def on_finish(self, result: StageRun) -> None:
        status = "[green]done" if result.ok else f"[red]failed (exit {result.exit_code})"
        self.progress.update(self.tasks[result.key], status=status)
        if not result.ok:
            self.progress.console.print(_failure(result), soft_wrap=True, markup=False, highlight=False)


@contextlib.contextmanager
def plain_or_live(console: Console) -> Iterator[PlainProgress | LiveProgress]:
    if not (sys.stdout.isatty() and console.is_terminal):
        yield PlainProgress()
        return
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                  transient=False) as progress:
        yield LiveProgress(progress)
