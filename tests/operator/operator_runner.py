"""The real operator, run against the emulator in its own thread (shared by the operator and chart tests)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, ClassVar

from spa_operator import kube


class OperatorRunner:
    """Starts and stops the real operator against the emulator.

    The operator runs in its own thread and event loop, as in production: kopf cancels every task of its loop when
    it stops, which would take the emulator and the harness down with it if they shared the loop.
    """

    running: ClassVar[set[OperatorRunner]] = set()  # started and not stopped: the conftest stops leftovers

    def __init__(self, url: str, namespaces: list[str], **cfg: Any) -> None:
        defaults = dict(timer_s=5.0, progress_s=0.5, retry_s=0.5, metrics_port=None)
        self.cfg = kube.Config(namespaces=namespaces, server=url, scanning=False, **{**defaults, **cfg})
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
        OperatorRunner.running.add(self)
        return self.controller

    async def stop(self) -> None:
        OperatorRunner.running.discard(self)
        if self.thread is None:
            return
        assert self.stop_flag is not None
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 60)
        assert not self.thread.is_alive(), "operator did not stop"
        self.thread = None
        assert self.error is None, self.error

    def stop_leftover(self) -> None:
        """Stop without checks: for a test that failed before its own stop() (else the thread retries forever)."""
        OperatorRunner.running.discard(self)
        if self.stop_flag is not None:
            self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(30)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None
