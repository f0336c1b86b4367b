"""bench.stats (the ratio of two interleaved sides, how much it could move by chance) and what the
report says of it."""

from __future__ import annotations

import random

import pytest
from bench import stats
from bench.report import CaseResult, Target, compared, within_chance


def noisy(n: int, scale: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [scale * rng.uniform(0.8, 1.2) for _ in range(n)]


def test_a_constant_ratio_has_no_spread() -> None:
    reference = noisy(20, 0.1, seed=1)
    low, high = stats.ratio_interval([1.2 * r for r in reference], reference)
    assert low == pytest.approx(1.2)
    assert high == pytest.approx(1.2)


def test_the_interval_holds_the_ratio_and_narrows_with_more_rounds() -> None:
    few_capsa, few_reference = noisy(10, 0.12, seed=2), noisy(10, 0.1, seed=3)
    many_capsa, many_reference = noisy(400, 0.12, seed=4), noisy(400, 0.1, seed=5)
    few = stats.ratio_interval(few_capsa, few_reference)
    many = stats.ratio_interval(many_capsa, many_reference)
    assert few[0] <= stats.ratio_of_medians(few_capsa, few_reference) <= few[1]
    assert many[0] <= stats.ratio_of_medians(many_capsa, many_reference) <= many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 2
    assert many[0] < 1.2 < many[1]


def test_rounds_are_resampled_in_pairs_so_the_machines_drift_cancels_out() -> None:
    # The machine's load changes from round to round, and each round's two sides share it.
    load = [1.0 + 3.0 * (i % 5) for i in range(20)]
    reference = [0.1 * x for x in load]
    capsa = [0.11 * x * (1.02 if i % 2 else 0.98) for i, x in enumerate(load)]
    paired = stats.ratio_interval(capsa, reference)
    unpaired = stats.ratio_interval(capsa, reference[:-1])
    assert 1.0 < paired[0] <= paired[1] < 1.2
    assert unpaired[1] - unpaired[0] > 5 * (paired[1] - paired[0])


def test_the_same_samples_give_the_same_interval() -> None:
    capsa, reference = noisy(20, 0.12, seed=6), noisy(20, 0.1, seed=7)
    assert stats.ratio_interval(capsa, reference) == stats.ratio_interval(capsa, reference)


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        stats.ratio_interval([], [0.1])


def test_a_verdict_whose_interval_holds_the_bound_is_said_to_be_within_chance() -> None:
    target = Target("ratio", "<=", 1.15, "ratio <= 1.15")
    rng = random.Random(8)
    load = [rng.uniform(0.8, 1.2) for _ in range(20)]
    reference = [0.1 * x for x in load]
    samples = {
        # About 1.14, give or take 0.05 from round to round: the bound is within reach.
        "capsa.start": [0.114 * x * rng.uniform(0.95, 1.05) for x in load],
        "reference.start": reference,
        # 1.5 in every round: surely missed.
        "capsa.teardown": [0.15 * x for x in load],
        "reference.teardown": reference,
    }
    start = compared("start", "start", samples, ("capsa.start", "reference.start"), target)
    teardown = compared(
        "start", "teardown", samples, ("capsa.teardown", "reference.teardown"), target
    )
    results = [CaseResult("start", rows=[start.judge(True), teardown.judge(True)])]
    [line] = within_chance(results)
    assert line.startswith(f"start start: {start.verdict} at {start.ratio:.2f}")
    # A smoke run judges nothing: nothing to say.
    start.verdict = teardown.verdict = "n/a"
    assert within_chance(results) == []
