"""Order statistics of timing samples, and the comparison of two interleaved sides."""

from __future__ import annotations

import math
from collections.abc import Sequence


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(samples: Sequence[float]) -> float:
    return quantile(samples, 0.5)


def p95(samples: Sequence[float]) -> float:
    return quantile(samples, 0.95)


def p99(samples: Sequence[float]) -> float:
    return quantile(samples, 0.99)


def ratio_of_medians(capsa: Sequence[float], reference: Sequence[float]) -> float:
    """How many times the reference's median capsa's median is: below 1 is faster."""
    return median(capsa) / median(reference)
