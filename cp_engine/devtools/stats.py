"""Confidence intervals for benchmark reports and README figures.

Contract: ``bootstrap_ci(values)`` returns ``(mean, low, high)`` of the mean with a
(1 - alpha) percentile interval from ``n_boot`` resamples drawn with ``random.Random(seed)``,
so the same inputs always give the same interval; an empty input gives NaNs.
``paired_bootstrap_ci(a, b)`` is the interval of mean(b - a) over paired items (the same
questions answered by two arms) and refuses samples of unequal length.
``ratio_ci(ratios)`` is the geometric mean of paired ratios with a Student-t interval.
"""
from __future__ import annotations

import math
import random
from typing import Sequence


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean."""
    vals = list(values)
    if not vals:
        return (float("nan"),) * 3
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return sum(vals) / n, lo, hi


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float, float]:
    """CI of mean(b - a) over paired items (same questions in both arms)."""
    if len(a) != len(b):
        raise ValueError("paired samples must have equal length")
    return bootstrap_ci([y - x for x, y in zip(a, b)], **kw)


# Two-sided 97.5 % quantiles of Student's t by degrees of freedom; past 30, ``_t975``
# expands around the normal quantile (within 0.001 of the table's values there).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def _t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def ratio_ci(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of paired ratios (on/off within each A/B pair) with a
    95 % Student-t interval on their logarithms: for a handful of pairs the bootstrap's
    interval is too narrow. Needs two or more positive ratios; otherwise NaNs."""
    logs = [math.log(r) for r in ratios if r > 0]
    n = len(logs)
    if n < 2 or n != len(ratios):
        return (float("nan"),) * 3
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
