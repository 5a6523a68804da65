"""The run's cost and ETA as Prometheus series, per run: a counter per ledger key (`spa_run_<key>_total`, e.g.
`spa_run_accelerator_seconds_total`, `spa_run_tokens_generated_total`), and gauges for the estimated remaining
seconds and the percent done. Values come from the run's status (`MetricValues`), so a restarted operator counts a
run again from zero up to its status's totals (a counter reset, which rate() and increase() handle). A deleted run's
series are removed."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from spa_workers.contract import Ledger

HELP = {
    Ledger.GOLD_LABELS: "Gold (human-labelled) preference pairs the run uses: seed and held-out",
    Ledger.PROMPTS: "Prompts answered",
    Ledger.ANSWERS_GENERATED: "Answers generated",
    Ledger.TOKENS_GENERATED: "Tokens generated",
    Ledger.PAIRS_JUDGED: "Pairs the judge produced",
    Ledger.TOKENS_SCORED: "Tokens through the implicit-reward forward passes",
    Ledger.PAIRS_TRAINED: "Pairs trained on, each epoch counted",
    Ledger.TOKENS_TRAINED: "Tokens trained on, each epoch counted",
    Ledger.ACCELERATOR_SECONDS: "Requested GPUs x wall time of the stages' pods",
    Ledger.CPU_SECONDS: "CPU time the stages' processes used",
    Ledger.CPU_SECONDS_REQUESTED: "Requested CPUs x wall time of the stages' pods",
    Ledger.BYTES_READ: "Bytes read from storage",
    Ledger.BYTES_WRITTEN: "Bytes written to storage",
    Ledger.JUDGE_CALLS: "Requests to the win-rate judge",
    Ledger.JUDGE_PROMPT_TOKENS: "Prompt tokens sent to the win-rate judge",
    Ledger.JUDGE_COMPLETION_TOKENS: "Completion tokens of the win-rate judge",
}


def counter_name(key: str) -> str:
    return f"spa_run_{key}"  # prometheus_client adds the `_total` suffix


class CostMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        run = ["namespace", "run"]
        self.counters = {k: Counter(counter_name(k), HELP[k], run, registry=registry) for k in Ledger.KEYS}
        self.remaining = Gauge("spa_run_estimated_remaining_seconds",
                               "Estimated seconds until the run ends (absent while unknown)", run, registry=registry)
        self.percent = Gauge("spa_run_progress_percentage", "Percent of the run done", run, registry=registry)
        self._counted: dict[tuple[str, str], dict[str, float]] = {}  # run -> totals counted so far

    def export(self, ns: str, name: str, cost: Mapping[str, float], remaining_s: float | None,
               percent: float | None) -> None:
        counted = self._counted.setdefault((ns, name), {})
        for key, total in cost.items():
            if key in self.counters and total > counted.get(key, 0.0):
                self.counters[key].labels(ns, name).inc(total - counted.get(key, 0.0))
                counted[key] = total
        if remaining_s is None:
            _remove(self.remaining, ns, name)
        else:
            self.remaining.labels(ns, name).set(remaining_s)
        if percent is not None:
            self.percent.labels(ns, name).set(percent)

    def forget(self, ns: str, name: str) -> None:
        for key in self._counted.pop((ns, name), {}):
            _remove(self.counters[key], ns, name)
        _remove(self.remaining, ns, name)
        _remove(self.percent, ns, name)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
