"""Arithmetic done by hand (no torch), for tests that check the SPA loss against its definition."""

from __future__ import annotations

import math


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile, by hand."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
