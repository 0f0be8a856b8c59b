"""The statistics every comparison reports (`evaluation.stats`): known values of the Wilson interval and the exact
McNemar test, and the paired difference's fields on hand-counted cases."""

from __future__ import annotations

import math

import pytest

from adapters_ds.evaluation.stats import (
    accuracy_summary,
    mcnemar_exact,
    newcombe_paired_interval,
    paired_difference,
    wilson_interval,
)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(81, 263)  # the textbook example: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    z2 = 1.959963984540054**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))  # closed form at 0 successes
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2)), pytest.approx(1.0))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_exact_mcnemar_known_cases():
    # 10 questions only the first model got right, 2 only the second: 2 * P(Binomial(12, 1/2) <= 2) = 158 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096) == pytest.approx(0.0385742, abs=1e-7)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided: symmetric
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # the smallest all-one-way count below 0.05
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # ... and one above it
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_difference_fields_on_a_hand_counted_case():
    # 200 questions: 40 both right, 30 only the adapted model, 5 only the base, 125 neither
    adapted = [True] * 40 + [True] * 30 + [False] * 5 + [False] * 125
    base = [True] * 40 + [False] * 30 + [True] * 5 + [False] * 125
    diff = paired_difference(adapted, base)
    assert (diff["n"], diff["only_first"], diff["only_second"]) == (200, 30, 5)
    assert diff["delta"] == 12.5  # (30 - 5) / 200 in points
    expected_p = 2 * sum(math.comb(35, k) for k in range(6)) / 2**35
    assert diff["p_value"] == pytest.approx(expected_p, abs=1e-6) and diff["significant"] is True
    lo, hi = diff["ci95"]
    assert 0 < lo < 12.5 < hi < 25
    # the pairs' positive correlation makes the paired interval narrower than the unpaired one of the same margins
    unpaired = newcombe_paired_interval(35 * 45 // 200, 35 - 35 * 45 // 200, 45 - 35 * 45 // 200, 0)
    assert hi - lo < 100 * (unpaired[1] - unpaired[0])
    same = paired_difference(base, base)
    assert (same["delta"], same["p_value"], same["significant"]) == (0.0, 1.0, False)
    assert same["ci95"][0] < 0 < same["ci95"][1]
    summary = accuracy_summary(adapted)
    assert summary["accuracy"] == 35.0 and summary["n"] == 200 and summary["ci95"][0] < 35.0 < summary["ci95"][1]
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(adapted, base[:-1])
