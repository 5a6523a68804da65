"""Stage fingerprints: one hash of everything that determines a stage's outputs.

A stage's fingerprint covers its arguments (all but `output` and the fields marked `{"execution": True}`, which
say how it runs, not what it computes) and the identity of each input:
- an input another stage published (its folder, a sharded stage's folder, or its `model/` subfolder): that
  stage's fingerprint (a sharded stage's: the hash of its shards' fingerprints), so a change anywhere upstream
  reaches every stage downstream;
- a plain local file: its sha256 (files over SMALL_FILE: size + modification time, hashing them costs too much);
- a plain local folder (a model): each file's name and size, and the sha256 of the small ones (config,
  tokenizer, weights index), so changed weights of the same size go unnoticed unless their mtime says so;
- an S3 object or folder: its ETag(s); `hf://` models: the URI itself (pin a revision with `@rev`).

The worker records the fingerprint (and what went into it) in the manifest and, finding a manifest, reuses the
output only when its fingerprint matches; `spa run` compares the same fingerprints before starting anything.
Importable without torch: the operator and the CLI use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from spa_workers import contract, storage
from spa_workers.contract import StageArgs

# Argument names that are input URIs (their identity, not their path, goes into the fingerprint).
INPUT_FIELDS = ("model", "policy", "reference", "pairs", "seed_pairs", "responses", "prompts", "heldout",
                "winrate_prompts", "winrate_reference_answers", "winrate_reference_model")
SMALL_FILE = 256 * 1024 * 1024
SMALL_MODEL_FILE = 4 * 1024 * 1024


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def combine_shards(fingerprints: list[str]) -> str:
    """The fingerprint of a sharded stage as a whole."""
    return _hash({"shards": fingerprints})


def fingerprinted_args(args: StageArgs) -> dict[str, Any]:
    """The arguments that determine a stage's outputs. A field marked `{"added": True}` (one added after stages
    were fingerprinted) counts only when it differs from its default, so adding it leaves earlier stages done."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            if not f.metadata.get("execution") and f.name != "output" and f.name not in INPUT_FIELDS
            and not (f.metadata.get("added") and getattr(args, f.name) == f.default)}


def input_uris(args: StageArgs) -> dict[str, str]:
    return {n: getattr(args, n) for n in INPUT_FIELDS if getattr(args, n, None)}


def fingerprint(args: StageArgs, inputs: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, what went into it) for `args` whose inputs have the given identities."""
    of = {"stage": args.stage, "contract": contract.CONTRACT_VERSION, "args": fingerprinted_args(args),
          "inputs": dict(sorted(inputs.items()))}
    return _hash(of), of


def stage_output_fingerprint(uri: str) -> str | None:
    """The fingerprint of the stage that published `uri`, or None when `uri` is no stage's output."""
    candidates = [uri]
    if uri.rstrip("/").endswith("/" + contract.MODEL_SUBDIR):
        candidates.append(uri.rstrip("/")[: -len(contract.MODEL_SUBDIR) - 1])
    for d in candidates:
        m = contract.read_manifest(d)
        if m is not None:
            return m.fingerprint or "unknown"
    shards = [d for d in storage.list_dirs(uri) if os.path.basename(d.rstrip("/")).startswith("shard-")]
    manifests = [contract.read_manifest(d) for d in shards]
    if shards and all(manifests):
        return combine_shards([m.fingerprint or "unknown" for m in manifests if m])
    return None


def content_identity(uri: str) -> str:
    """A cheap identity of a plain file or folder (see the module docstring)."""
    if uri.startswith("hf://"):
        return uri
    if storage.is_s3(uri):
        return "etag:" + storage.etag(uri)
    path = storage._local(uri)
    if os.path.isfile(path):
        st = os.stat(path)
        if st.st_size > SMALL_FILE:
            return f"size:{st.st_size}:mtime:{st.st_mtime_ns}"
        return "sha256:" + contract.file_digest(path)["sha256"]
    if os.path.isdir(path):
        entries = []
        for rel in storage.list_files(path):
            full = os.path.join(path, rel)
            st = os.stat(full)
            digest = (contract.file_digest(full)["sha256"] if st.st_size <= SMALL_MODEL_FILE
                      else f"mtime:{st.st_mtime_ns}")
            entries.append((rel, st.st_size, digest))
        return "tree:" + _hash(entries)
    return "missing"


def input_identity(uri: str) -> str:
    return stage_output_fingerprint(uri) or content_identity(uri)


def of_stage(args: StageArgs) -> tuple[str, dict[str, Any]]:
    """The fingerprint of `args` with its inputs as they are in storage now (what the worker records)."""
    return fingerprint(args, {n: input_identity(u) for n, u in input_uris(args).items()})


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any],
                    name: Callable[[str], str] = lambda arg: arg) -> str:
    """What differs between two `fingerprint_of` records, e.g. "learning_rate 5e-05 -> 0.0001; input pairs".

    `name` says an argument as the reader knows it (the CLI: the manifest field it comes from)."""
    if not old:
        return "written before stage fingerprints, so its settings are unknown"
    changes = []
    old_args, new_args = old.get("args", {}), new.get("args", {})
    for arg in sorted(set(old_args) | set(new_args)):
        if arg not in new_args:  # the stage no longer has this argument (another version of spa made it)
            changes.append(f"{name(arg)} {old_args[arg]!r} (no longer an argument)")
        elif arg not in old_args:
            changes.append(f"{name(arg)} {new_args[arg]!r} (a new argument)")
        elif old_args[arg] != new_args[arg]:
            changes.append(f"{name(arg)} {old_args[arg]!r} -> {new_args[arg]!r}")
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    changed_inputs = [name(n) for n in sorted(set(old_in) | set(new_in)) if old_in.get(n) != new_in.get(n)]
    if changed_inputs:
        changes.append("changed input " + ", ".join(dict.fromkeys(changed_inputs)))
    if old.get("contract") != new.get("contract"):
        changes.append(f"contract version {old.get('contract')} -> {new.get('contract')}")
    return "; ".join(changes) or "different settings"
