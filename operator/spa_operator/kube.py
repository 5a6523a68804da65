"""The Kubernetes executor's kopf wiring: observe a run, ask the decision core, act.

What to do lives in `reconcile.decide` (pure: observations -> actions and the complete new status); how observations
are gathered (the run, its Jobs and pods from kopf indexes, stage manifests and heartbeats from storage, the
credentials Secret) in `observe`; carrying decisions out in `controller`; the API calls in `kubeapi`; the
Prometheus metrics in `metrics`. This module wires them to kopf and serves /healthz, /readyz and /metrics.

Flow (one reconciler per run, a kopf daemon, so a run is never reconciled twice at once):
- the daemon starts on create/resume, reconciles, then sleeps until woken or a slow timer fires;
- the operator's own Job and pod watches (`informer`, indexes of their views by run uid) wake the run's daemon when
  what it decides on changed, so the next Job exists within milliseconds of the previous one finishing, and a pod
  stuck in ImagePullBackOff shows in the status within one reconcile;
- a new spec generation wakes it too; a change other than `suspend` after the start (which the CRD already forbids)
  fails the run with SpecImmutable.
The new status is diffed against the status the API server has (not against the operator's memory), so edits by
anyone else are repaired.

Finalizer: kopf adds `spa.dev/finalizer` to each run so the daemon is stopped cleanly before the run goes. While no
operator runs, deleting a run (or its namespace) waits for it; remove the finalizer by hand to delete a run then
(its Jobs go with it through their ownerReferences).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from typing import Any

import kopf
from prometheus_client import generate_latest

from spa_operator import crd, jobs
from spa_operator.config import Config, SettingError
from spa_operator.controller import COMPONENT, Controller, RetrySoon
from spa_operator.kubeapi import ApiError, KubeApi, api_error
from spa_operator.lease import LeaseElector
from spa_operator.metrics import Metrics
from spa_operator.observe import (
    RunState,
    first_difference,
    job_view,
    older_version,
    pod_view,
    run_root,
    validate_for_cluster,
)

__all__ = ["ApiError", "Config", "Controller", "KubeApi", "Metrics", "RunState", "api_error", "first_difference",
           "job_view", "main", "pod_view", "run_operator", "run_root", "validate_for_cluster"]

RUNS = (crd.GROUP, crd.VERSION, crd.PLURAL)
NAMESPACE = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
FINALIZER = "spa.dev/finalizer"
FINALIZER_WAIT_S = 20.0  # the first decision waits this long at most for kopf's finalizer patch to land
log = logging.getLogger("spa_operator")


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, built only where it is used. kopf builds it for every watch event by deep-copying the whole
    object (and deep-copies that again to strip its progress annotations), which was the largest cost per event.

    kopf uses it for on.create/update/field handlers (the operator has none) and to reset the idle timer of daemons
    declared with `idle=` (the run daemon is not): no diff is needed, so every essence is empty."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if extra_fields:  # a handler watching a field needs it kept
            return super().build(body=body, extra_fields=extra_fields)
        return kopf.BodyEssence()



def _uid(body: Any) -> str:
    meta = body.get("metadata", {})
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


def _ctl(memo: Any) -> Controller:
    return memo["controller"] if isinstance(memo, dict) else memo.controller


@kopf.on.login()
def login(memo: Any, logger: Any, settings: Any, **kwargs: Any) -> kopf.ConnectionInfo | None:
    cfg = _ctl(memo).cfg
    if cfg.server:
        return kopf.ConnectionInfo(server=cfg.server, insecure=True)
    return kopf.login_via_client(logger=logger, settings=settings, **kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    settings.scanning.disabled = not ctl.cfg.scanning
    # kopf posts only its own handler warnings as Events; the operator posts the transitions' Events itself.
    settings.posting.level = logging.WARNING
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="spa.dev")
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix="spa.dev", key="last-handled-configuration")
    settings.posting.reporting_component = COMPONENT
    # The run watches end and resume like the operator's own (the same timeout and inactivity limit: a silent stream
    # is dead, bookmarks arriving every minute).
    settings.watching.server_timeout = ctl.cfg.watch_timeout_s
    settings.watching.inactivity_timeout = ctl.cfg.watch_idle_s
    settings.networking.request_timeout = 60
    ctl.healthy = True


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    """The operator is stopping (SIGTERM, the stop flag): no write goes out from here on, and a Lease held is
    released now, not after kopf has waited up to 5 s for its leftover tasks: the next replica takes over at once."""
    ctl = _ctl(memo)
    ctl.api.fenced = True
    if ctl.elector is not None and ctl.leading:
        ctl.leading = False
        await ctl.elector.release()


@kopf.on.event(*RUNS)
async def run_changed(body: Any, memo: Any, **_: Any) -> None:
    """Wake the run's reconciler when its spec changed (a new generation) or when a version newer than the one its
    refused status patch was decided from arrived; its own status patches do not. While the run waits for kopf's
    finalizer, every event of the run wakes it: kopf has put the event's body in the daemon's view before this runs.

    An event handler rather than on.update: kopf then keeps no diff base (no annotation write per run, no essence
    computed per event); the reconciler compares specs itself."""
    ctl = _ctl(memo)
    rs = ctl.runs.get(_uid(body))
    meta = body.get("metadata", {})
    if rs is not None and (rs.awaiting_finalizer or meta.get("generation") != rs.generation
                           or (rs.stale is not None and older_version(rs.stale, meta.get("resourceVersion")))):
        rs.waker.set()


@kopf.daemon(*RUNS, cancellation_timeout=5.0)
async def run_daemon(body: Any, stopped: Any, memo: Any, logger: Any, **_: Any) -> None:
    ctl = _ctl(memo)
    uid = _uid(body)
    meta = body.get("metadata", {})
    rs = ctl.runs.setdefault(uid, RunState(uid, meta.get("namespace", "")))
    try:
        await ctl.synced()  # the first reconcile must see every Job of the run
        # kopf adds its finalizer with a patch of its own as a new run first shows up. The run's first Jobs go out at
        # once; its first status patch and Events wait for the finalizer (every event of the run wakes the wait,
        # `run_changed`): the patch's resourceVersion precondition would fail otherwise, and cost a refused write and
        # a second decision. On a busy API server the finalizer can land seconds late. The body's metadata is read
        # afresh each time: kopf replaces the body's source as events arrive.
        # Measured in a 1000-run burst: holding the whole first decision for the finalizer instead delayed the first
        # Jobs, and let them go out all at once when the finalizers' events arrived together.
        give_up = time.monotonic() + FINALIZER_WAIT_S
        rs.awaiting_finalizer = True
        held = False
        while not stopped and time.monotonic() < give_up:
            rs.waker.clear()
            if FINALIZER in (body.get("metadata", {}).get("finalizers") or []):
                break
            if not held:
                await _reconcile(ctl, rs, body, logger, hold=True)
                held = True
                continue  # the finalizer may have landed meanwhile
            await _sleep(rs, stopped, give_up - time.monotonic())
        rs.awaiting_finalizer = False
        while not stopped:
            rs.waker.clear()
            await _sleep(rs, stopped, await _reconcile(ctl, rs, body, logger))
    finally:
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            ctl.runs.pop(uid, None)
            ctl.metrics.forget(meta.get("namespace", ""), meta.get("name", ""))


async def _reconcile(ctl: Controller, rs: RunState, body: Any, logger: Any, hold: bool = False) -> float | None:
    """One reconcile of the run (`Controller.reconcile`); returns seconds until the next unprompted one."""
    t0 = time.monotonic()
    try:
        delay = await ctl.reconcile(rs, body, ctl.jobs, logger, ctl.pods, hold=hold)
        log.debug(f"{body.get('metadata', {}).get('name')}: reconciled in {1000 * (time.monotonic() - t0):.1f} ms")
        return delay
    except RetrySoon as e:
        return ctl.cfg.retry_s if e.delay is None else e.delay
    except Exception as e:  # never crash-loop: log it, look again later
        logger.exception(f"reconcile failed: {type(e).__name__}")
        return ctl.cfg.retry_s


async def _sleep(rs: RunState, stopped: Any, timeout: float | None) -> None:
    """Until the run's reconciler is woken, the daemon is stopped, or `timeout` seconds (None: no limit) passed."""
    wake = asyncio.ensure_future(rs.waker.wait())
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({wake, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        wake.cancel()
        stop.cancel()


# ------------------------------------------------------------------------------------------------------ http, main


async def serve_http(ctl: Controller, host: str, port: int) -> Any:
    from aiohttp import web

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(ctl.metrics.registry), content_type="text/plain")

    async def healthz(_: web.Request) -> web.Response:
        """Liveness: the process runs (a replica waiting for the Lease is alive too)."""
        return web.Response(status=200 if ctl.healthy else 503, text="ok" if ctl.healthy else "starting")

    async def readyz(_: web.Request) -> web.Response:
        """Readiness: this replica acts on runs (it leads) and every watch has listed its namespace."""
        why = ctl.not_ready()
        return web.Response(status=503 if why else 200, text=why or "ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class NoCluster(Exception):
    """Neither in-cluster credentials nor a kubeconfig: `spa-operator` says so in one line (exit 2)."""


def make_controller(cfg: Config) -> Controller:
    import kubernetes

    if cfg.server:
        conf = kubernetes.client.Configuration(host=cfg.server)
    else:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException:
            try:
                kubernetes.config.load_kube_config()
            except (kubernetes.config.ConfigException, OSError) as e:
                raise NoCluster(f"no Kubernetes API to talk to: not in a cluster, and no usable kubeconfig "
                                f"(KUBECONFIG or ~/.kube/config): {e}") from None
        conf = kubernetes.client.Configuration.get_default_copy()
    return Controller(cfg, KubeApi(conf, cfg.identity))


async def run_operator(cfg: Config, stop_flag: Any = None, ready_flag: Any = None,
                       controller: Controller | None = None) -> None:
    """Run the operator in the current event loop until stop_flag (an asyncio or threading Event) is set, or (in
    the main thread) SIGTERM/SIGINT, on which a Lease held is released for the next replica.

    kopf cancels every task of the loop when it stops: give it a loop of its own (tests run it in a thread).
    """
    ctl = controller or make_controller(cfg)
    stop = stop_flag if stop_flag is not None else asyncio.Event()
    http = await serve_http(ctl, cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port is not None else None
    ctl.healthy = True  # alive from here on, ready once it leads and its watches listed (/readyz)
    elector = None
    try:
        if cfg.lease:
            namespace, _, name = cfg.lease.partition("/")
            elector = ctl.elector = LeaseElector(ctl.api, namespace, name, cfg.identity, cfg.lease_duration_s,
                                                 cfg.lease_renew_s, cfg.renew_deadline_s)
            ctl.leading = False
            await elector.acquire()
            ctl.leading = True
        watches = ctl.watch()
        try:
            await _operate(ctl, cfg, stop, ready_flag, elector)
        finally:
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            if elector is not None and ctl.leading:  # stopped while leading, before kopf's cleanup: hand over
                ctl.api.fenced = True
                await elector.release()
    finally:
        ctl.healthy = False
        if http is not None:
            await http.cleanup()
        await ctl.api.close()


async def _operate(ctl: Controller, cfg: Config, stop: Any, ready_flag: Any, elector: LeaseElector | None) -> None:
    operator = asyncio.ensure_future(kopf.operator(
        clusterwide=not cfg.namespaces, namespaces=cfg.namespaces, standalone=True, stop_flag=stop,
        ready_flag=ready_flag, memo=kopf.Memo(controller=ctl)))
    if elector is None:
        await operator
        return
    holder = asyncio.ensure_future(elector.hold())
    await asyncio.wait({operator, holder}, return_when=asyncio.FIRST_COMPLETED)
    if not holder.done() or holder.exception() is None:  # stopped, or released by the cleanup on the way out
        holder.cancel()
        await operator
        return
    # The Lease is lost (or its renewal was not confirmed in time): another replica may act now. Every write is
    # refused from this instant, before kopf has stopped the reconcilers.
    ctl.api.fenced = True
    ctl.leading = False
    log.error(f"stopping: {holder.exception() or 'the Lease is lost'}")
    stop.set()
    await operator
    holder.result()  # raises LeaseLost: the process exits non-zero and its pod restarts as a candidate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spa-operator", description="Run the AlignmentRun operator (kopf).")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch this namespace (repeatable; default: all namespaces)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPA_METRICS_PORT", 8080)),
                   help="port for /metrics and /healthz (0: off)")
    p.add_argument("--worker-image", default=os.environ.get("SPA_WORKER_IMAGE", jobs.DEFAULT_WORKER_IMAGE))
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    for ns in args.namespace:  # the operator lists and watches each one by name: no patterns
        if not re.fullmatch(NAMESPACE, ns):
            p.error(f"--namespace {ns!r}: not a namespace name (lowercase letters, digits and '-'; no patterns)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # kopf logs every handled Job event at INFO; transitions are Events and metrics
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        cfg = Config.from_env(namespaces=args.namespace, metrics_port=args.metrics_port or None,
                              worker_image=args.worker_image)
    except SettingError as e:
        print(f"spa-operator: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_operator(cfg))
    except NoCluster as e:
        print(f"spa-operator: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
