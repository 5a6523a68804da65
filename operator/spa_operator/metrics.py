"""The operator's Prometheus metrics. Values come from the decision core (`core_types.MetricValues`), which derives
them from a run's status alone, so a restarted operator exports finished runs again (their alerts do not resolve)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from spa_workers.contract import ManifestKeys as K

from spa_operator.core_types import PHASES, MetricValues
from spa_operator.cost_metrics import CostMetrics

# evaluate's win-rate figures: manifest key -> (gauge name, help)
WIN_RATE_GAUGES = {
    K.WIN_RATE: ("spa_iteration_win_rate", "Win rate against the reference, percent"),
    K.WIN_RATE_SE: ("spa_iteration_win_rate_stderr", "Standard error of the win rate, percent"),
    K.LC_WIN_RATE: ("spa_iteration_lc_win_rate", "Length-controlled win rate against the reference, percent"),
    K.LC_WIN_RATE_SE: ("spa_iteration_lc_win_rate_stderr", "Standard error of the LC win rate, percent"),
    K.JUDGE_FAILED: ("spa_iteration_judge_failed", "Judgments given up after retries"),
}
# answer lengths (mean tokens per answer), watched for drift: manifest key -> (gauge name, help)
LENGTH_GAUGES = {
    K.EVAL_ANSWER_TOKENS: ("spa_iteration_answer_tokens", "Mean tokens per answer of the iteration's model on the "
                                                          "win-rate prompts"),
    K.SFT_ANSWER_TOKENS: ("spa_iteration_sft_answer_tokens", "Mean tokens per answer of the SFT model on the same "
                                                             "prompts (the length gate's baseline)"),
    K.ANSWER_TOKENS: ("spa_iteration_sampled_answer_tokens", "Mean tokens per answer the iteration's generate stage "
                                                             "sampled (from the previous iteration's model)"),
    K.HELDOUT_AGREEMENT_SE: ("spa_iteration_heldout_agreement_stderr", "Standard error of the held-out agreement"),
}


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        run = ["namespace", "run"]
        self.phase = Gauge("spa_run_phase", "1 for the run's current phase", [*run, "phase"], registry=r)
        self.iteration = Gauge("spa_run_iteration", "Iteration of the run's current stage", run, registry=r)
        self.progress = Gauge("spa_run_stage_progress", "Fraction done of the current stage", run, registry=r)
        # One series per running stage (value: its start, Unix seconds): which stage a run is in, and for how long.
        self.stage_started = Gauge("spa_run_stage_started_timestamp_seconds", "Start time of each running stage",
                                   [*run, "iteration", "stage"], registry=r)
        self.stage_seconds = Histogram("spa_stage_duration_seconds", "Stage wall time (first Job to manifest)",
                                       ["stage"], registry=r,
                                       buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400))
        self.job_outcomes = Counter("spa_job_outcomes_total", "Finished stage Jobs by outcome",
                                    ["stage", "outcome"], registry=r)
        self.transition = Histogram("spa_transition_seconds", "Job seen finished -> next Job created", registry=r,
                                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.storage_errors = Counter("spa_storage_errors_total", "Storage reads that failed", registry=r)
        self.api_requests = Counter("spa_operator_api_requests_total", "API requests made by the reconciler",
                                    ["verb"], registry=r)
        # Waits for a pooled connection included: a create that queued behind watches would show here.
        self.api_latency = Histogram("spa_operator_api_request_seconds", "API request latency (answer read)",
                                     ["verb"], registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        it = [*run, "iteration"]
        self.quality = {
            K.PAIRS: Gauge("spa_iteration_pairs_judged", "Pairs the judge kept", it, registry=r),
            K.REWARD_GAP: Gauge("spa_iteration_reward_gap", "Mean chosen-rejected implicit reward gap", it,
                                registry=r),
            K.REFINED_FRACTION: Gauge("spa_iteration_refined_fraction", "Fraction of samples self-refined", it,
                                      registry=r),
            K.LOSS: Gauge("spa_iteration_dpo_loss", "Final DPO loss", it, registry=r),
            K.REWARD_ACCURACY: Gauge("spa_iteration_reward_accuracy", "Training reward accuracy", it, registry=r),
            K.HELDOUT_AGREEMENT: Gauge("spa_iteration_heldout_agreement", "Held-out gold agreement", it,
                                       registry=r),
            **{k: Gauge(name, doc, it, registry=r) for k, (name, doc) in {**WIN_RATE_GAUGES, **LENGTH_GAUGES}.items()},
        }
        self.cost = CostMetrics(r)  # spa_run_<ledger key>_total, the ETA
        self._exported: dict[tuple[str, str], tuple[Any, ...]] = {}  # run -> what export last set
        self._stage_labels: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._quality_labels: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def export(self, ns: str, name: str, values: MetricValues) -> None:
        """A run's gauges and counters; gauges are skipped when nothing changed (most reconciles change nothing)."""
        for stage, outcome in values.outcomes:
            self.job_outcomes.labels(stage, outcome).inc()
        for stage, seconds in values.durations:
            self.stage_seconds.labels(stage).observe(seconds)
        key = (values.phase, values.iteration, values.progress, tuple(sorted(values.running.items())),
               tuple(sorted(values.quality.items())), tuple(values.cost.items()), values.remaining_s, values.percent)
        if self._exported.get((ns, name)) == key:
            return
        self._exported[(ns, name)] = key
        self.set_phase(ns, name, values.phase)
        if values.iteration is not None:
            self.iteration.labels(ns, name).set(values.iteration)
        if values.progress is not None:
            self.progress.labels(ns, name).set(values.progress)
        self.set_running_stages(ns, name, dict(values.running))
        for (iteration, metric), value in values.quality.items():
            self.quality[metric].labels(ns, name, iteration).set(value)
        self._quality_labels[(ns, name)] = set(values.quality)
        self.cost.export(ns, name, values.cost, values.remaining_s, values.percent)

    def set_phase(self, ns: str, name: str, phase: str) -> None:
        for p in PHASES:
            self.phase.labels(ns, name, p).set(1 if p == phase else 0)

    def set_running_stages(self, ns: str, name: str, stages: dict[tuple[str, str], float]) -> None:
        """stages: (iteration, stage) -> start time of every running stage of the run."""
        old = self._stage_labels.get((ns, name), set())
        for gone in old - set(stages):
            _remove(self.stage_started, ns, name, *gone)
        for (iteration, stage), started in stages.items():
            self.stage_started.labels(ns, name, iteration, stage).set(started)
        self._stage_labels[(ns, name)] = set(stages)

    def forget(self, ns: str, name: str) -> None:
        """A deleted run's series."""
        self._exported.pop((ns, name), None)
        for g in (self.iteration, self.progress):
            _remove(g, ns, name)
        self.set_running_stages(ns, name, {})
        self._stage_labels.pop((ns, name), None)
        for p in PHASES:
            _remove(self.phase, ns, name, p)
        for iteration, metric in self._quality_labels.pop((ns, name), set()):
            _remove(self.quality[metric], ns, name, iteration)
        self.cost.forget(ns, name)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
