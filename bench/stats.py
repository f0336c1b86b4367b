"""Order statistics of timing samples, and the comparison of two interleaved sides."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

# Enough resamples for an interval stable to the second decimal of a ratio.
_RESAMPLES = 2000


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
    return _interval(list(_resampled_ratios(capsa, reference, random.Random(0))), confidence)


def change_interval(
    before: tuple[Sequence[float], Sequence[float]],
    after: tuple[Sequence[float], Sequence[float]],
    confidence: float = 0.95,
) -> tuple[float, float]:
    """The bootstrap interval of how many times ``before``'s ratio of medians ``after``'s is
    (each a pair of capsa's and the reference's samples, from two runs): an interval that holds
    1 says the two runs may differ by chance alone. Each run is resampled as
    :func:`ratio_interval` resamples it, the two independently; the seed is fixed."""
    rng = random.Random(0)
    return _interval(
        [
            new / old
            for old, new in zip(
                _resampled_ratios(*before, rng), _resampled_ratios(*after, rng), strict=True
            )
        ],
        confidence,
    )


def _resampled_ratios(
    capsa: Sequence[float], reference: Sequence[float], rng: random.Random
) -> Iterator[float]:
    if not capsa or not reference:
        raise ValueError("no samples")
    paired = len(capsa) == len(reference)
    for _ in range(_RESAMPLES):
        if paired:
            rounds = rng.choices(range(len(capsa)), k=len(capsa))
            yield median([capsa[i] for i in rounds]) / median([reference[i] for i in rounds])
        else:
            yield (
                median(rng.choices(capsa, k=len(capsa)))
                / median(rng.choices(reference, k=len(reference)))
            )


def _interval(values: list[float], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    return quantile(values, tail), quantile(values, 1 - tail)
