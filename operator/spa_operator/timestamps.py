"""RFC 3339 timestamps as the API server writes them (status, conditions, objects' metadata)."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: Any) -> float | None:
    """Unix seconds of an RFC 3339 UTC timestamp (fromisoformat: strptime cost a third of a millisecond per Job
    event)."""
    return _parse_utc(text) if isinstance(text, str) and text.endswith("Z") else None


@functools.lru_cache(maxsize=4096)
def _parse_utc(text: str) -> float | None:
    # Cached: each decision reads every stage record's and condition's times again (~40 a transition).
    try:
        return dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None
