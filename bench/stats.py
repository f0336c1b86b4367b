"""Order statistics of timing samples, and the comparison of two interleaved sides."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

# Enough resamples for an interval stable to the second decimal of a ratio.
_RESAMPLES = 2000
# One run's samples of a compared row: capsa's side, the reference's.
Run = tuple[Sequence[float], Sequence[float]]


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


def ratio_interval(
    capsa: Sequence[float], reference: Sequence[float], confidence: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval of :func:`ratio_of_medians`: how far this run's ratio
    could have moved by chance alone.

    When both sides have one sample per round (interleaved: capsa, reference, capsa...), rounds
    are resampled in pairs, so that each pair keeps the machine's load of its moment and only
    the difference between the sides counts; otherwise each side is resampled on its own. The
    generator's seed is fixed: the same samples always give the same interval.
    """
    rng = random.Random(0)
    return _interval(
        [_resampled_ratio(capsa, reference, rng) for _ in range(_RESAMPLES)], confidence
    )


def change_interval(
    before: Sequence[Run], after: Sequence[Run], confidence: float = 0.95
) -> tuple[float, float]:
    """The bootstrap interval of how many times the ratio of medians of the runs ``before`` that
    of the runs ``after`` is (a run: capsa's and the reference's samples of one row), each side's
    ratio the mean of its runs' ratios: an interval that holds 1 says the two sides may differ by
    chance alone. A run's rounds are resampled as :func:`ratio_interval` resamples them; with
    several runs a side, the runs are resampled too, so that the interval also holds how much
    runs of the same code differ (the machine's speed drifts between runs, which no run's rounds
    show). The seed is fixed."""
    rng = random.Random(0)

    def side(runs: Sequence[Run]) -> float:
        chosen = rng.choices(runs, k=len(runs)) if len(runs) > 1 else runs
        return statistics.fmean(_resampled_ratio(*run, rng) for run in chosen)

    if not before or not after:
        raise ValueError("no runs")
    return _interval([side(after) / side(before) for _ in range(_RESAMPLES)], confidence)


def _resampled_ratio(
    capsa: Sequence[float], reference: Sequence[float], rng: random.Random
) -> float:
    if not capsa or not reference:
        raise ValueError("no samples")
    if len(capsa) == len(reference):
        rounds = rng.choices(range(len(capsa)), k=len(capsa))
        return median([capsa[i] for i in rounds]) / median([reference[i] for i in rounds])
    return median(rng.choices(capsa, k=len(capsa))) / median(
        rng.choices(reference, k=len(reference))
    )


def _interval(values: list[float], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    return quantile(values, tail), quantile(values, 1 - tail)
