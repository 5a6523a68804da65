"""Training checkpoints: when to take one, where they are written, how they reach storage and come back.

A checkpoint is the Trainer's own (under FSDP its SHARDED_STATE_DICT: every rank writes its shard of the model
and optimiser through torch.distributed.checkpoint; under DDP the full model and optimiser from rank 0), written
into a local scratch dir — SPA_SCRATCH_DIR (a sized volume in a pod) or the temp dir — then uploaded to
`<output>/checkpoints/checkpoint-<step>/` in parallel: each process of a node uploads its share of that node's
files. After a barrier, global rank 0 adds `spa_state.json` (margin window, step log, how it was trained) and the
`_COMPLETE` marker, last. A restarted stage fetches the newest complete checkpoint the same way, each process of a
node downloading its share.

The marker carries the fingerprint of the stage that wrote it (fingerprint.py): a stage restarted with other
arguments or inputs never resumes from it; its checkpoints are moved aside (aside.py) and it starts over.

Cadence: every `checkpoint_every_steps` optimiser steps and/or every `checkpoint_every_minutes` (rank 0's clock,
broadcast so that all ranks decide alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

from spa_workers import fingerprint, storage

SPA_STATE_FILE = "spa_state.json"
CHECKPOINT_DONE = "_COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"
SCRATCH_ENV = "SPA_SCRATCH_DIR"


def scratch_dir(output: str) -> str:
    """This node's local scratch dir for a stage, distinct per stage output and per node (GROUP_RANK, set by
    torchrun): "nodes" that share one filesystem, as in a local emulation, must not write into each other's."""
    root = os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    key = hashlib.sha256(output.encode()).hexdigest()[:16]
    return os.path.join(root, f"spa-train-{key}-node{os.environ.get('GROUP_RANK', '0')}")


def delete_checkpoint(uri: str) -> None:
    """Delete a checkpoint, its completeness marker first, so a crash mid-delete never leaves one that looks whole."""
    marker = storage.join(uri, CHECKPOINT_DONE)
    if storage.exists(marker):
        storage.delete_tree(marker)
    storage.delete_tree(uri)


def checkpoint_step(uri: str) -> int:
    """N of a `.../checkpoint-N` URI; -1 for anything else."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    number = name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else -1


def latest_checkpoint(root: str) -> tuple[str, int] | None:
    """(URI, step) of the newest complete checkpoint under `root`, if any."""
    found = sorted(((checkpoint_step(d), d) for d in storage.list_dirs(root)), reverse=True)
    for step, uri in found:
        if step >= 0 and storage.exists(storage.join(uri, CHECKPOINT_DONE)):
            return uri, step
    return None


def made_otherwise(root: str, stage_fingerprint: str, fingerprint_of: dict[str, Any]) -> str | None:
    """What differs when the newest complete checkpoint under `root` was written by the stage with other settings
    or inputs (or before checkpoints carried fingerprints); None when it matches or there is none."""
    found = latest_checkpoint(root)
    if found is None:
        return None
    marker = json.loads(storage.read_text(storage.join(found[0], CHECKPOINT_DONE)) or "{}")
    if marker.get("fingerprint") == stage_fingerprint:
        return None
    return fingerprint.describe_change(marker.get("fingerprint_of") or {}, fingerprint_of)


def my_share(paths: list[str], local_rank: int, local_world: int) -> list[str]:
    """The files this process of a node moves: every local_world-th of the sorted list, from local_rank."""
    return sorted(paths)[local_rank::local_world]


def upload_share(local_dir: str, dest: str, local_rank: int, local_world: int) -> int:
    """Upload this process's share of the node's checkpoint files; returns how many it uploaded."""
    share = my_share(storage.list_files(local_dir), local_rank, local_world)
    for rel in share:
        storage.upload_file(os.path.join(local_dir, rel), storage.join(dest, rel))
    return len(share)


def download_share(uri: str, local_dir: str, local_rank: int, local_world: int) -> None:
    """Download this process's share of a checkpoint's files into the node's local dir."""
    for rel in my_share(storage.list_files(uri), local_rank, local_world):
        storage.download_file(storage.join(uri, rel), os.path.join(local_dir, rel))


def finish_checkpoint(root: str, step: int, spa_state: dict[str, Any], stage_fingerprint: str = "",
                      fingerprint_of: dict[str, Any] | None = None) -> str:
    """Global rank 0, once every rank's files are uploaded: the SPA state, the marker (last, with the fingerprint of
    the stage writing it), old ones deleted."""
    dest = storage.join(root, f"{CHECKPOINT_PREFIX}{step}")
    storage.write_text(storage.join(dest, SPA_STATE_FILE), json.dumps(spa_state))
    marker = {"step": step, "fingerprint": stage_fingerprint, "fingerprint_of": fingerprint_of or {}}
    storage.write_text(storage.join(dest, CHECKPOINT_DONE), json.dumps(marker))  # last: complete
    for old in storage.list_dirs(root):
        if old.rstrip("/") != dest.rstrip("/"):
            delete_checkpoint(old)
    return dest


def reset_local(path: str) -> None:
    """An empty local dir (what a killed attempt left there is stale)."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


class Cadence:
    """Whether to checkpoint after a step: by step count and/or by elapsed minutes since the last one."""

    def __init__(self, every_steps: int, every_minutes: float, clock=time.monotonic) -> None:
        self.every_steps, self.every_s = max(every_steps, 0), max(every_minutes, 0.0) * 60.0
        self.clock = clock
        self.last = clock()

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0 or self.every_s > 0

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_s > 0 and self.clock() - self.last >= self.every_s
        return by_steps or by_time

    def taken(self) -> None:
        self.last = self.clock()
