"""Runs one stage under the contract: skip if done, write outputs, then the manifest last.

Under a multi-process launcher (`accelerate launch`, torchrun: WORLD_SIZE > 1) every process runs the body,
but only the main process publishes outputs, writes the heartbeat and the manifest; rank 0's "already done"
decision is broadcast so all ranks agree, and the ranks meet after the body and after the manifest at barriers
that sit outside the training process group (collectives.wait_long), so that minutes of rank 0 writing, hashing
and uploading a 7B model never run into the collective timeout.
Single-process runs never import torch here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from spa_workers import aside, checkpoints, collectives, contract, fingerprint, live_metrics, storage, usage
from spa_workers.contract import StageArgs, StageManifest


@dataclass
class StageWork:
    """What a stage body gets: a local folder for its outputs and places to put counts and metrics."""

    args: StageArgs
    output: str  # URI where this stage (or shard) publishes
    dir: str  # local folder whose files are published under `output`
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    ledger: dict[str, float] = field(default_factory=dict)  # what the stage spent (`contract.Ledger` keys)
    ledger_estimated: set[str] = field(default_factory=set)  # ledger keys that are estimates, not counts
    is_main: bool = True  # False on the non-main ranks of a multi-process run: their `dir` is not published
    fingerprint: str = ""  # the stage's fingerprint (main process only), also carried by its checkpoints
    fingerprint_of: dict = field(default_factory=dict)  # what went into it
    # Run (by the main process) after the manifest is written, e.g. to delete training checkpoints.
    after_manifest: list[Callable[[], None]] = field(default_factory=list)
    _heartbeat: contract.Heartbeat | None = None

    def spend(self, key: str, amount: float, estimated: bool = False) -> None:
        """Add to the stage's ledger (see `contract.Ledger`); `estimated` marks the entry as not counted."""
        self.ledger[key] = self.ledger.get(key, 0) + amount
        if estimated:
            self.ledger_estimated.add(key)

    def set_aside(self, uri: str, why: str) -> str | None:
        """Move `uri` (this stage's output or a folder inside it) aside because `why` (aside.py); it is deleted
        once this stage's manifest is written (`run_stage`)."""
        moved = aside.move_aside(uri)
        if moved:
            print(f"{self.args.stage}: {why}: moved {uri} aside to {moved} (deleted once this stage succeeds)",
                  file=sys.stderr)
        return moved

    def progress(self, done: int, total: int, unit: str = "items", force: bool = False, **extra: float) -> None:
        if not self.is_main:
            return
        if self._heartbeat is None or self._heartbeat.total != max(total, 1):
            self._heartbeat = contract.Heartbeat(self.output, total, unit=unit,
                                                 interval=float(os.environ.get("SPA_HEARTBEAT_S", "15")))
            force = True
        self._heartbeat.update(done, force=force or done >= total, **extra)
        live_metrics.record(self.args.stage, done, total, unit, extra)


def resolve_shard(args: StageArgs) -> StageArgs:
    """Fill the shard index from JOB_COMPLETION_INDEX (Indexed Jobs) when it was not given."""
    if not args.sharded or args.shard_index >= 0:  # type: ignore[attr-defined]
        return args
    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    return replace(args, shard_index=index)  # type: ignore[call-arg]


def output_of(args: StageArgs) -> str:
    if args.sharded:
        return contract.shard_dir(args.output, args.shard_index, args.shard_count)  # type: ignore[attr-defined]
    return args.output  # type: ignore[attr-defined]


def _broadcast_from_main(value):
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


OVERWRITE_ENV = "SPA_OVERWRITE_STALE"
# Timings measured before the stage body (spa-worker's `startup_s`: scheduled or process start -> libraries imported).
STARTUP: dict[str, float] = {}


def _reuse_decision(out: str, fp: str, of: dict) -> tuple[str, str]:
    """("run" | "done" | "replace" | an error, what changed): "done" when a manifest with this fingerprint exists,
    "replace" when one made differently does and OVERWRITE_ENV says to redo it, else the error."""
    old = contract.read_manifest(out)
    if old is None:
        return "run", ""
    if old.fingerprint == fp:
        return "done", ""
    change = fingerprint.describe_change(old.fingerprint_of, of)
    if os.environ.get(OVERWRITE_ENV) == "1":
        return "replace", change
    return (f"{out} holds outputs made with other settings ({change}); delete that folder, write to a new one, "
            f"or set {OVERWRITE_ENV}=1 to redo it (the old outputs are moved aside until it succeeds)"), change


def run_stage(args: StageArgs, body: Callable[[StageWork], None]) -> int:
    args = resolve_shard(args)
    out = output_of(args)
    dist = collectives.distributed_state()
    is_main = dist is None or dist.is_main_process
    fp, of = fingerprint.of_stage(args) if is_main else ("", {})
    decision, change = _reuse_decision(out, fp, of) if is_main else ("", "")
    if dist is not None:
        decision = _broadcast_from_main(decision)  # one answer for all ranks, even without shared storage
    if decision == "done":
        if is_main:
            print(f"{args.stage}: {out} already has a manifest with this fingerprint; nothing to do", file=sys.stderr)
        return 0
    if decision not in ("run", "replace"):
        raise contract.StageInputError(decision)
    t0 = time.time()
    if not is_main:
        return _run_secondary(args, out, body)
    work = StageWork(args=args, output=out, dir="", fingerprint=fp, fingerprint_of=of,
                     timings=dict(STARTUP))
    if decision == "replace":  # moved aside, not deleted: removed once the new manifest is written
        work.set_aside(out, f"made with other settings ({change})")
    local_out = None if storage.is_s3(out) else storage._local(out)
    # Local outputs are built in a hidden sibling folder and moved in, so a crash leaves nothing under `out`
    # but an ignored scratch dir; S3 outputs are built in a temp dir and uploaded before the manifest.
    if local_out is not None:
        os.makedirs(local_out, exist_ok=True)
        for stale in Path(local_out).glob(".work-*"):  # left by a killed attempt
            shutil.rmtree(stale, ignore_errors=True)
        workdir = tempfile.mkdtemp(prefix=".work-", dir=local_out)
    else:
        # On the node's sized scratch volume when there is one (a 7B model is 14.5 GB), else the temp dir.
        scratch = os.environ.get(checkpoints.SCRATCH_ENV)
        if scratch:
            os.makedirs(scratch, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="spa-stage-", dir=scratch or None)
    work.dir = workdir
    live_metrics.live()  # serve from the start of the stage when SPA_WORKER_METRICS_PORT is set
    usage0 = usage.baseline()
    try:
        body(work)
        collectives.wait_long()  # every rank's part of the body is done (this rank may have written for minutes)
        others = usage.of_other_ranks(True, usage0) if dist is not None else []
        # Finite numbers only, checked before anything is published: a NaN loss or reward is a diverged model,
        # not a result (and no reader could pass it on: a Kubernetes API server refuses NaN in a status).
        contract.require_finite({"counts": work.counts, "metrics": work.metrics, "timings": work.timings,
                                 "ledger": work.ledger}, f"{args.stage}: {out}")
        contract.check_ledger(work.ledger, f"{args.stage}: {out}")
        files = {}
        for rel in storage.list_files(workdir):
            path = os.path.join(workdir, rel)
            if local_out is not None:
                files[rel] = contract.file_digest(path)
                dest = os.path.join(local_out, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(path, dest)
            elif os.path.getsize(path) > contract.ETAG_IDENTIFIES_ABOVE:
                # A large file (model weights) is identified by the ETag S3 computed from the bytes it received,
                # not hashed again here (reading 14.5 GB once more costs minutes).
                storage.upload_file(path, storage.join(out, rel))
                files[rel] = {"bytes": os.path.getsize(path), "etag": storage.etag(storage.join(out, rel)),
                              "part_bytes": storage.MULTIPART_THRESHOLD}
            else:
                files[rel] = contract.file_digest(path)
                storage.upload_file(path, storage.join(out, rel))
        work.timings["wall_s"] = time.time() - t0
        moved = sum(f["bytes"] for f in files.values()) if local_out is not None else 0
        usage.spend(work, usage0, others, time.time() - usage.stage_started(), moved)
        print(f"{args.stage}: ledger: {work.ledger[contract.Ledger.CPU_SECONDS]:.1f} CPU-seconds over "
              f"{len(others) + 1} process(es)", file=sys.stderr)
        contract.check_ledger(work.ledger, f"{args.stage}: {out}")
        manifest = StageManifest(stage=args.stage, files=files, counts=work.counts, metrics=work.metrics,
                                 timings=work.timings, args=args.to_argv(), versions=contract.versions(),
                                 fingerprint=fp, fingerprint_of=of, ledger=work.ledger,
                                 ledger_estimated=sorted(work.ledger_estimated))
        storage.write_text(storage.join(out, contract.MANIFEST), manifest.to_json())
        # published: what it replaces, set aside until now (here or by `spa run --rerun-from/--force`), goes first
        for hook in [lambda: aside.forget_replaced(out), *work.after_manifest]:
            try:
                hook()
            except Exception as e:  # the stage is done; a failed cleanup must not turn it into a failure
                print(f"{args.stage}: warning: cleanup after the manifest failed: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    collectives.wait_long()  # the others waited while this rank hashed and uploaded
    print(f"{args.stage}: done in {time.time() - t0:.1f}s -> {out}", file=sys.stderr)
    return 0


def _run_secondary(args: StageArgs, out: str, body: Callable[[StageWork], None]) -> int:
    """A non-main rank: run the body in a private scratch dir that is never published; wait for the main."""
    workdir = tempfile.mkdtemp(prefix="spa-stage-rank-")
    usage0 = usage.baseline()
    try:
        body(StageWork(args=args, output=out, dir=workdir, is_main=False))
        collectives.wait_long()  # the main writes its outputs now
        usage.of_other_ranks(False, usage0)  # the main counts this rank's CPU time and traffic, then publishes
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    collectives.wait_long()  # the main hashes, uploads and writes the manifest: minutes for a 7B model
    return 0
