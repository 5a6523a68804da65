"""What a finished stage (or shard) leaves behind: its output files, its manifest (written last: its presence is
what "done" means), the heartbeat it writes while running, and how readers find and check them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from spa_workers import storage
from spa_workers.contract.args import StageArgs
from spa_workers.contract.common import CONTRACT_VERSION, StageInputError, dumps, non_finite, shard_dir

MANIFEST = "_SUCCESS.json"
PROGRESS = "_PROGRESS.json"
# Where each stage's outputs live inside its output dir.
MODEL_SUBDIR = "model"
RESPONSES_FILE = "responses.jsonl"
PAIRS_FILE = "pairs.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class StageManifest:
    """Written last by a finished stage (or shard): its presence is what "done" means."""

    stage: str
    # relative path -> {"bytes": n, "sha256": hex}; a file above ETAG_IDENTIFIES_ABOVE published to S3:
    # {"bytes": n, "etag": S3's ETag, "part_bytes": the upload's part size}
    files: dict[str, dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    contract_version: int = CONTRACT_VERSION
    # What determines the outputs (see `fingerprint`); "" in manifests written before fingerprints existed.
    fingerprint: str = ""
    fingerprint_of: dict[str, Any] = field(default_factory=dict)
    # What the stage spent (`Ledger` keys only, each >= 0); the names of entries that are estimates, not counts.
    ledger: dict[str, float] = field(default_factory=dict)
    ledger_estimated: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageManifest:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        # A manifest written before the finite-numbers rule may hold NaN: readers (the operator's status, reports,
        # metrics) must never pass it on, so such figures are dropped here, where every reader gets its manifests.
        for section in (manifest.counts, manifest.metrics, manifest.timings, manifest.ledger):
            for key in [k for k, v in section.items() if non_finite(v)]:
                del section[key]
        return manifest


def read_manifest(stage_dir: str) -> StageManifest | None:
    uri = storage.join(stage_dir, MANIFEST)
    if not storage.exists(uri):
        return None
    return StageManifest.from_json(storage.read_text(uri))


def stage_manifest_dirs(args: StageArgs) -> list[str]:
    """Every directory whose manifest must exist for the stage as a whole to be done."""
    if args.sharded:
        n = args.shard_count  # type: ignore[attr-defined]
        return [shard_dir(args.output, i, n) for i in range(n)]  # type: ignore[attr-defined]
    return [args.output]  # type: ignore[attr-defined]


def read_stage_manifests(args: StageArgs) -> list[StageManifest] | None:
    """All manifests of a stage, or None while any shard is unfinished."""
    out = []
    for d in stage_manifest_dirs(args):
        m = read_manifest(d)
        if m is None:
            return None
        out.append(m)
    return out


def finished_shard_dirs(stage_output: str) -> list[str]:
    """Shard dirs of a sharded stage that carry a manifest, in order, checked for completeness."""
    dirs = sorted(d for d in storage.list_dirs(stage_output) if os.path.basename(d.rstrip("/")).startswith("shard-"))
    if not dirs:
        raise StageInputError(f"{stage_output}: no shard output found (has the previous stage run?)")
    total = int(dirs[0].rstrip("/").rsplit("-of-", 1)[1])
    done = [d for d in dirs if storage.exists(storage.join(d, MANIFEST))]
    if len(done) != total:
        raise StageInputError(f"{stage_output}: {len(done)} of {total} shards finished; refusing partial input")
    return done


# Above this size a file published to S3 is identified in its manifest by its ETag, which S3 computed from the
# bytes it received (the MD5 of the MD5s of its multipart parts; boto3 also sends a CRC32 checksum with each part,
# which S3 checks), instead of a sha256 that would read the file once more (~1.5 s for 538 MB here, minutes at 14.5
# GB). Smaller files and local outputs keep their sha256.
ETAG_IDENTIFIES_ABOVE = storage.MULTIPART_THRESHOLD


def file_digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "trl", "peft", "vllm"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    engines = getattr(sys.modules.get("spa_workers.vllm_engine"), "BUILT", None)
    if engines:  # how the answers or scores were computed (vllm_engine.engine_mode)
        out["vllm_engine"] = ", ".join(dict.fromkeys(engines))
    return out


class Heartbeat:
    """Writes `_PROGRESS.json` at most every `interval` seconds (and at 0 and 1)."""

    def __init__(self, output: str, total: int, interval: float = 15.0, unit: str = "items") -> None:
        self.output, self.total, self.interval, self.unit = output, max(total, 1), interval, unit
        self.start = time.monotonic()
        self.last = -1e9
        self.done = 0

    def update(self, done: int, force: bool = False, **extra: float) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        frac = min(done / self.total, 1.0)
        eta = (self.total - done) / rate if rate > 0 else None
        payload = {"fraction": frac, "done": done, "total": self.total, "unit": self.unit,
                   "rate_per_s": rate, "eta_s": eta, "elapsed_s": elapsed, "time": time.time(),
                   **{k: v for k, v in extra.items() if not non_finite(v)}}  # a live figure may be NaN mid-step
        storage.write_text(storage.join(self.output, PROGRESS), dumps(payload))
