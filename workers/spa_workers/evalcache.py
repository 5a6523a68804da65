"""What the evaluate stages of one run keep in its storage (`<run root>/cache/`), so that a retry, a new attempt or
the next iteration does not pay again for work whose inputs have not changed:

- `judgments/<judge>/*.jsonl`: every judge verdict, keyed by the judge model, the annotator template, the extra
  request fields, the instruction and both outputs in the order shown (a refusal is kept too: at temperature 0 the
  judge would refuse again). Written in batches as judgments arrive, so a crash loses at most one batch.
- `answers/<key>.json`: sampled answers of a model (the SFT or reference model's answers once per run, a policy's
  once per attempt), keyed by the model's identity (`fingerprint.input_identity`), the prompts and the sampling
  settings. Answers are seeded per prompt, so a cached set equals a fresh one.
- `heldout/<key>.json`: an iteration's held-out agreement, keyed by both models' identities, the held-out file's and
  the scoring settings: computed before the judge is asked, so a judge failure does not lose it (the failure line
  names it) and the next attempt does not score the pairs again.

The cache holds derived data only; deleting it costs recomputation, never results. Importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import Any

from spa_workers import contract, storage
from spa_workers.fingerprint import input_identity

CACHE_DIR = "cache"
FLUSH_EVERY = 64  # judgments per file written
FLUSH_S = 10.0  # ... or after this long


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def run_cache(root: str) -> str:
    return storage.join(root, CACHE_DIR)


class JudgmentCache:
    """P(first output wins) per (judge, template, instruction, output shown first, output shown second); None is a
    refusal. Thread-safe; `flush` writes what is new as one file (never rewriting another attempt's)."""

    def __init__(self, cache: str, judge: str) -> None:
        self.dir = storage.join(cache, "judgments", judge)
        self._lock = threading.Lock()
        self._known: dict[str, float | None] = {}
        self._new: dict[str, float | None] = {}
        self._last_flush = time.monotonic()
        self._prefix = uuid.uuid4().hex[:12]
        self._files = 0
        for rel in storage.list_files(self.dir):
            for line in storage.read_text(storage.join(self.dir, rel)).splitlines():
                try:
                    row = json.loads(line)
                    self._known[row["key"]] = row["p_first"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line of a killed writer: that judgment is asked again

    def __len__(self) -> int:
        return len(self._known)

    def get(self, key: str) -> tuple[bool, float | None]:
        with self._lock:
            return (True, self._known[key]) if key in self._known else (False, None)

    def put(self, key: str, p_first: float | None) -> None:
        with self._lock:
            self._known[key] = self._new[key] = p_first
            due = len(self._new) >= FLUSH_EVERY or time.monotonic() - self._last_flush >= FLUSH_S
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._new = self._new, {}
            self._last_flush = time.monotonic()
            self._files += 1
            name = f"{self._prefix}-{self._files:05d}.jsonl"
        if rows:
            storage.write_text(storage.join(self.dir, name), "".join(
                contract.dumps({"key": k, "p_first": v}) + "\n" for k, v in rows.items()))


def answers_key(model: str, prompts: list[Any], settings: dict[str, Any]) -> str:
    return key_of("answers", input_identity(model), prompts, settings)


def read_answers(cache: str, key: str) -> list[tuple[str, int] | None] | None:
    """Cached answers as (text, tokens) per prompt (None where the prompt did not fit), or None when not cached."""
    uri = storage.join(cache, "answers", f"{key}.json")
    try:
        rows = json.loads(storage.read_text(uri))
    except (FileNotFoundError, ValueError):
        return None
    return [tuple(r) if r is not None else None for r in rows]  # type: ignore[misc]


def write_answers(cache: str, key: str, answers: list[tuple[str, int] | None]) -> None:
    storage.write_text(storage.join(cache, "answers", f"{key}.json"), contract.dumps(answers))


def heldout_key(policy: str, reference: str, heldout: str, settings: dict[str, Any]) -> str:
    return key_of("heldout", input_identity(policy), input_identity(reference), input_identity(heldout), settings)


def heldout_uri(cache: str, key: str) -> str:
    return storage.join(cache, "heldout", f"{key}.json")


def read_heldout(cache: str, key: str) -> dict[str, float] | None:
    try:
        return json.loads(storage.read_text(heldout_uri(cache, key)))
    except (FileNotFoundError, ValueError):
        return None


def write_heldout(cache: str, key: str, figures: dict[str, float]) -> str:
    uri = heldout_uri(cache, key)
    storage.write_text(uri, contract.dumps(figures))
    return uri
