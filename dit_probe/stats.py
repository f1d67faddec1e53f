"""Confidence intervals shared by the studies."""

from __future__ import annotations

import numpy as np


def mean_ci(values, n_boot: int = 1000, rng=None, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): a percentile bootstrap CI of the mean. NaNs are dropped; none left: NaNs."""
    rng = rng if rng is not None else np.random.default_rng(0)
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.nan, np.nan, np.nan
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(v[idx].mean(1), [tail, 100 - tail])
    return float(v.mean()), float(lo), float(hi)
