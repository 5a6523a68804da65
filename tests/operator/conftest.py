"""Fixtures for the operator tests: the emulated cluster, the Job-controller harness, an operator runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import start_cluster
from operator_runner import OperatorRunner


@pytest.fixture(autouse=True)
def _stop_leftover_operators():
    """An operator a failed test left running would retry its dead emulator for the rest of the session."""
    yield
    for runner in list(OperatorRunner.running):
        runner.stop_leftover()


@pytest_asyncio.fixture
async def cluster():
    async with start_cluster() as c:
        yield c
        # Before the emulator closes: a stopped server would leave a leftover operator retrying for a minute.
        for runner in list(OperatorRunner.running):
            await asyncio.to_thread(runner.stop_leftover)


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
