"""Fixtures for the operator tests: the emulated cluster, the Job-controller harness, an operator runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import start_cluster
from spa_operator import kube


class OperatorRunner:
    """Starts and stops the real operator against the emulator.

    The operator runs in its own thread and event loop, as in production: kopf cancels every task of its loop when
    it stops, which would take the emulator and the harness down with it if they shared the loop.
    """

    def __init__(self, url: str, namespaces: list[str], **cfg: Any) -> None:
        defaults = dict(timer_s=5.0, progress_s=0.5, retry_s=0.5)
        self.cfg = kube.Config(namespaces=namespaces, server=url, scanning=False, metrics_port=None,
                               **{**defaults, **cfg})
        self.thread: threading.Thread | None = None
        self.stop_flag: threading.Event | None = None
        self.controller: kube.Controller | None = None
        self.error: BaseException | None = None
        self.starts = 0

    def _main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(kube.run_operator(self.cfg, self.stop_flag, ready, self.controller))
        except BaseException as e:  # surfaced by alive()/stop()
            self.error = e
            ready.set()

    async def start(self) -> kube.Controller:
        assert self.thread is None or not self.thread.is_alive()
        self.stop_flag, ready = threading.Event(), threading.Event()
        self.controller = kube.make_controller(self.cfg)
        self.thread = threading.Thread(target=self._main, args=(ready,), name="operator", daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(ready.wait, 30), "operator did not start"
        assert self.error is None, self.error
        self.starts += 1
        return self.controller

    async def stop(self) -> None:
        if self.thread is None:
            return
        assert self.stop_flag is not None
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 60)
        assert not self.thread.is_alive(), "operator did not stop"
        self.thread = None
        if self.controller is not None:
            self.controller.api.pool.shutdown(wait=False)
        assert self.error is None, self.error

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None


@pytest_asyncio.fixture
async def cluster():
    async with start_cluster() as c:
        yield c


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest_asyncio.fixture
async def operator_logs():
    """Every log line of the operator (and kopf) at DEBUG, for scanning."""
    handler = LogCapture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for noisy in ("aiohttp.access", "botocore", "boto3", "urllib3", "s3transfer", "werkzeug", "asyncio", "celpy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)
