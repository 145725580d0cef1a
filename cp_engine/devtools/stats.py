"""Seeded percentile-bootstrap intervals for benchmark reports and README figures.

Contract: ``bootstrap_ci(values)`` returns ``(mean, low, high)`` of the mean with a
(1 - alpha) percentile interval from ``n_boot`` resamples drawn with ``random.Random(seed)``,
so the same inputs always give the same interval; an empty input gives NaNs.
``paired_bootstrap_ci(a, b)`` is the interval of mean(b - a) over paired items (the same
questions answered by two arms) and refuses samples of unequal length.
"""
from __future__ import annotations

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
