"""95% confidence intervals for evaluation summaries.

- A mean (an aspect's 1-5 scores, a paired difference): the percentile bootstrap. `resamples`
  samples of n values drawn with replacement by numpy's Generator seeded with `seed`; the interval
  is the 2.5th and 97.5th percentiles of their means (numpy's default linear interpolation). It
  makes no normality assumption (scores are bounded and lumpy) and a seed makes it reproducible.
- A rate (A's win / tie / lose share of n comparisons): the Wilson score interval,
  (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.959964; it stays inside [0, 1]
  and is sensible at 0 or n successes, where the normal interval collapses to a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal
RESAMPLES = 10_000


def mean_ci(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES
) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) with the percentile bootstrap; (None, None, None) for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None, None, None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))  # (resamples, n)
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(x.mean()), float(low), float(high)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float | None, float | None, float | None]:
    """(rate, low, high) with the Wilson score interval; (None, None, None) for n = 0."""
    if n == 0:
        return None, None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def summary(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """{"mean", "ci": [low, high], "n"} of values (the JSON the summaries hold)."""
    mean, low, high = mean_ci(values, seed, resamples)
    return {"mean": _round(mean), "ci": [_round(low), _round(high)], "n": len(values)}


def rate(successes: int, n: int) -> dict:
    """{"rate", "ci": [low, high], "count", "n"} of successes out of n."""
    p, low, high = wilson(successes, n)
    return {"rate": _round(p), "ci": [_round(low), _round(high)], "count": successes, "n": n}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
