"""Confidence intervals shared by the studies."""

from __future__ import annotations

import numpy as np
import pandas as pd


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


def group_cis(frame: pd.DataFrame, keys, measures, n_boot: int = 1000, first=(), means=()) -> pd.DataFrame:
    """One row per group of ``keys`` (in order of appearance): the keys, the group's first value of each
    ``first`` column, its size ``n``, the plain mean of each ``means`` column, and each of ``measures`` as
    mean, ``_lo``, ``_hi`` (95% bootstrap CI). One generator seeded 0 runs through the groups in order, so a
    table is the same in every process."""
    rng = np.random.default_rng(0)
    rows = []
    for key, g in frame.groupby(list(keys), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(keys, key)), **{c: g[c].iloc[0] for c in first}, "n": len(g)}
        row.update({c: g[c].astype(float).mean() for c in means})
        for m in measures:
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        rows.append(row)
    return pd.DataFrame(rows)
