"""How much an accuracy measured on n questions says: intervals and paired tests for correct/wrong flags.

Used wherever accuracies are compared (the main job's `gain.json`, `bench/adapter_table.py`), so every reported
number carries the same statistics:

- one accuracy: the Wilson score interval (Wilson 1927), which stays inside [0, 100] % and keeps close to its
  nominal coverage for small n and for accuracies near 0 or 100 %, where the normal ("Wald") interval fails;
- a paired difference (two models answering the same questions): the difference of the accuracies with Newcombe's
  hybrid score interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10), built
  from the two Wilson intervals and the correlation of the pairs; and the exact McNemar test's two-sided p-value,
  which uses only the discordant questions (one model right, the other wrong): under "no difference" each of them is
  a fair coin, so the p-value is a binomial tail, computed exactly (no normal approximation, no continuity fudge).

Accuracies and differences are in percent (points), as `results.accuracy` reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: two-sided 95 % intervals
PAIRED_TEST = "exact McNemar (two-sided binomial test on the discordant pairs)"
PAIRED_INTERVAL = "Newcombe hybrid score interval for paired proportions (method 10)"


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion correct/n, as fractions in [0, 1]; (0, 1) for n = 0."""
    if not 0 <= correct <= n:
        raise ValueError(f"expected 0 <= correct <= n, found correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (questions only the first, resp. only the second
    model got right): P(a Binomial(b + c, 1/2) count at least as far from the middle), capped at 1."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"expected counts >= 0, found {only_first}, {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def accuracy_summary(flags: Sequence[bool]) -> dict[str, Any]:
    """{"accuracy", "n", "ci95": [lo, hi]} of correct flags, in percent (rounded to 2 decimals)."""
    n, correct = len(flags), sum(bool(f) for f in flags)
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": _pct(correct / n if n else 0.0), "n": n, "ci95": [_pct(lo), _pct(hi)]}


def paired_difference(first: Sequence[bool], second: Sequence[bool]) -> dict[str, Any]:
    """first's accuracy minus second's on the same questions (flags in the same order), in points:
    {"delta", "ci95": [lo, hi], "p_value", "n", "only_first", "only_second", "significant"}; significant means the
    exact McNemar p-value is below 0.05."""
    if len(first) != len(second):
        raise ValueError(f"paired flags must cover the same questions, found {len(first)} and {len(second)}")
    n = len(first)
    both = sum(1 for a, b in zip(first, second, strict=True) if a and b)
    only_first = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
    neither = n - both - only_first - only_second
    lo, hi = newcombe_paired_interval(both, only_first, only_second, neither)
    p_value = mcnemar_exact(only_first, only_second)
    return {
        "delta": _pct((only_first - only_second) / n if n else 0.0),
        "ci95": [_pct(lo), _pct(hi)],
        "p_value": float(f"{p_value:.4g}"),  # 4 significant digits: a tiny p stays > 0
        "n": n,
        "only_first": only_first,
        "only_second": only_second,
        "significant": p_value < 0.05,
    }


def newcombe_paired_interval(both: int, only_first: int, only_second: int, neither: int) -> tuple[float, float]:
    """95 % interval of p1 - p2 (fractions) for paired flags from the 2x2 counts: p1 = (both + only_first) / n,
    p2 = (both + only_second) / n (Newcombe 1998, method 10). (-1, 1) for no pairs."""
    n = both + only_first + only_second + neither
    if n == 0:
        return -1.0, 1.0
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n)
    l2, u2 = wilson_interval(both + only_second, n)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    # the pairs' correlation, its numerator shrunk towards 0 as in Newcombe's paper (B - n/2 when B > n/2)
    covariance = both * neither - only_first * only_second
    covariance = covariance - n / 2 if covariance > n / 2 else min(covariance, 0)
    phi = covariance / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


def _pct(fraction: float) -> float:
    return round(100.0 * fraction, 2)
