"""Optional live Prometheus metrics of a running worker, fed by `StageWork.progress(...)`.

Off unless SPA_WORKER_METRICS_PORT is set (the operator sets it on the Job's container, with a container port named
"metrics" for the chart's PodMonitor). The endpoint lives as long as the worker process: a Job's pod is scraped while
its stage runs. prometheus_client is imported only when the endpoint is on.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

PORT_ENV = "SPA_WORKER_METRICS_PORT"
# progress(..., **extra) keys exported as gauges (train: loss, samples_per_s; generate: tokens_per_s)
EXTRA_GAUGES = {
    "loss": ("spa_worker_loss", "Latest training loss"),
    "samples_per_s": ("spa_worker_samples_per_second", "Training samples per second"),
    "tokens_per_s": ("spa_worker_tokens_per_second", "Generated tokens per second"),
}


class LiveMetrics:
    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        r = self.registry = CollectorRegistry()
        labels = ["stage", "unit"]
        self.fraction = Gauge("spa_worker_progress", "Fraction done of this worker's stage (or shard)", labels,
                              registry=r)
        self.done = Gauge("spa_worker_items_done", "Items done (unit label: prompts, answers, steps, ...)", labels,
                          registry=r)
        self.total = Gauge("spa_worker_items_total", "Items this worker has to do", labels, registry=r)
        self.rate = Gauge("spa_worker_items_per_second", "Items per second since the stage began", labels,
                          registry=r)
        self.heartbeat = Gauge("spa_worker_last_progress_timestamp_seconds", "When progress was last reported",
                               ["stage"], registry=r)
        self.extra = {k: Gauge(name, doc, ["stage"], registry=r) for k, (name, doc) in EXTRA_GAUGES.items()}
        self.server, self.thread = start_http_server(port, addr=host, registry=r)
        self.start = time.monotonic()
        self.started_total: int | None = None

    def update(self, stage: str, done: int, total: int, unit: str, extra: dict[str, Any]) -> None:
        if self.started_total != total:  # a new phase of the stage (e.g. generate, then score): restart the clock
            self.started_total, self.start = total, time.monotonic()
        total = max(total, 1)
        elapsed = time.monotonic() - self.start
        self.fraction.labels(stage, unit).set(min(done / total, 1.0))
        self.done.labels(stage, unit).set(done)
        self.total.labels(stage, unit).set(total)
        self.rate.labels(stage, unit).set(done / elapsed if elapsed > 0 else 0.0)
        self.heartbeat.labels(stage).set(time.time())
        for key, gauge in self.extra.items():
            value = extra.get(key)
            if isinstance(value, int | float):
                gauge.labels(stage).set(value)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_live: LiveMetrics | None = None
_tried = False


def live() -> LiveMetrics | None:
    """The process's endpoint, started on first use when SPA_WORKER_METRICS_PORT is set; None when off."""
    global _live, _tried
    if not _tried:
        _tried = True
        port = os.environ.get(PORT_ENV, "").strip()
        if port and port != "0":
            try:
                _live = LiveMetrics(int(port))
            except (OSError, ValueError, ImportError) as e:  # metrics must never fail a stage
                print(f"warning: live metrics off ({PORT_ENV}={port}): {e}", file=sys.stderr)
    return _live


def record(stage: str, done: int, total: int, unit: str, extra: dict[str, Any]) -> None:
    m = live()
    if m is not None:
        m.update(stage, done, total, unit, extra)


def reset() -> None:
    """Stop the endpoint (tests)."""
    global _live, _tried
    if _live is not None:
        _live.close()
    _live, _tried = None, False
