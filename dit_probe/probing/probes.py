"""Linear probes on attention maps (paper section 5.1, Fig. 7), with scikit-learn.

A probe is trained on the maps of one token (e.g. the colour word) to predict a label (the colour),
and then applied, unchanged, to the maps of another token of the same images (the object word).
If it still finds the label there, the other token's maps carry that information: *leakage*.

- Cross-validation is grouped by seed: a test fold holds seeds the probe never saw, and the grid
  uses the same seeds for every label, so image layout cannot give the label away.
- Two probe kinds, as in docs/design.md, section 5: a multiclass logistic regression (chance 1/K) and
  one-vs-rest binary logistic regressions with balanced class weights (Fig. 7's "ratio of maps
  classified as colour c"; balanced weights put an uninformed probe's ratio near 0.5).
- A shuffled-label control is the same procedure trained on permuted labels: the empirical chance.
- Confidence intervals: a percentile bootstrap over seeds of the out-of-fold predictions (images
  of one seed move together); ``fold_std`` is the spread of the metric over the folds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

# metric names, by the maps they are measured on: "own" = held-out maps of the token the probe was
# trained on (does the probe work?), "other" = the other token's maps of the same images (leakage)
METRIC_NAMES = {
    "own": {"accuracy": "accuracy", "ratio": "ovr_ratio", "balanced": "ovr_balanced"},
    "other": {"accuracy": "leakage", "ratio": "ovr_leakage_ratio", "balanced": "ovr_leakage_balanced"},
}


class ProbeDataError(ValueError):
    """The data cannot support the requested probe (too few samples, classes or seeds)."""


@dataclass
class ProbeSettings:
    folds: int = 5
    C: float = 1.0  # inverse L2 strength of the logistic regressions
    bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0
    max_iter: int = 2000


def check_design(labels, groups, folds: int) -> None:
    """Raise a clear error when grouped cross-validation cannot be run on these labels and groups."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ProbeDataError(f"a probe needs at least 2 classes; got {len(classes)} ({list(classes)})")
    if folds < 2:
        raise ProbeDataError(f"cross-validation needs folds >= 2; got folds={folds}")
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise ProbeDataError(
            f"too few samples for {folds}-fold cross-validation grouped by seed: the data has {n_groups} seed(s). "
            f"Generate at least {folds} seeds, or lower folds (minimum 2)"
        )
    for c in classes:
        if len(np.unique(groups[labels == c])) < folds:
            raise ProbeDataError(
                f"class {c!r} occurs in fewer than {folds} seeds, so some folds would have no test or training "
                "samples of it: use a full grid with the same seeds for every class"
            )


def _fit(X, y, C, max_iter, ovr: bool):
    base = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced" if ovr else None)
    model = make_pipeline(StandardScaler(), OneVsRestClassifier(base) if ovr else base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def _decisions(ovr, X) -> np.ndarray:
    """(n, K) one-vs-rest decisions; with 2 classes sklearn fits one classifier, for class 1 (class 0: its negation)."""
    d = ovr.decision_function(X)
    return np.column_stack([d < 0, d > 0]) if d.ndim == 1 else d > 0


def out_of_fold(X_own, X_other, labels, groups, settings: ProbeSettings, shuffled: bool = False) -> dict:
    """Out-of-fold predictions of the multiclass and one-vs-rest probes trained on ``X_own``.

    X_own, X_other: (n, features), the two tokens' maps of the same n images; labels, groups: (n,).
    Returns integer label codes: ``y`` (n,), ``fold`` (n,), ``multi_own`` / ``multi_other`` (n,),
    ``ovr_own`` / ``ovr_other`` (n, K) bool: each one-vs-rest classifier's decision.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes, y = np.unique(labels, return_inverse=True)
    n, k = len(y), len(classes)
    out = {"y": y, "classes": classes, "fold": np.zeros(n, int), "multi_own": np.zeros(n, int),
           "multi_other": np.zeros(n, int), "ovr_own": np.zeros((n, k), bool), "ovr_other": np.zeros((n, k), bool)}
    rng = np.random.default_rng(settings.seed + 1)
    for f, (train, test) in enumerate(GroupKFold(n_splits=settings.folds).split(X_own, y, groups)):
        y_train = rng.permutation(y[train]) if shuffled else y[train]
        multi = _fit(X_own[train], y_train, settings.C, settings.max_iter, ovr=False)
        ovr = _fit(X_own[train], y_train, settings.C, settings.max_iter, ovr=True)
        out["fold"][test] = f
        out["multi_own"][test] = multi.predict(X_own[test])
        out["multi_other"][test] = multi.predict(X_other[test])
        out["ovr_own"][test] = _decisions(ovr, X_own[test])
        out["ovr_other"][test] = _decisions(ovr, X_other[test])
    return out


def _sufficient_stats(y, pred, ovr, k):
    """Per-image counts from which every metric is a ratio of sums (so a bootstrap is a reweighting)."""
    onehot = np.eye(k, dtype=bool)[y]
    return np.concatenate(
        [(pred == y)[:, None], np.ones((len(y), 1)), ovr & onehot, onehot, ovr & ~onehot, ~onehot], axis=1
    ).astype(float)


def _metrics_from(s, k) -> dict[str, np.ndarray]:
    """s: (..., 2 + 4k) summed stats -> metric name -> (...,) values, plus per-class ratios (..., k)."""
    correct, n = s[..., 0], s[..., 1]
    tp, pos, fp, neg = (s[..., 2 + i * k: 2 + (i + 1) * k] for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / pos, fp / neg
    return {"accuracy": correct / n, "ratio": np.nanmean(tpr, -1), "balanced": np.nanmean((tpr + 1 - fpr) / 2, -1),
            "per_class": tpr}


def summarise(oof: dict, groups, settings: ProbeSettings) -> list[dict]:
    """Metrics (see ``METRICS``) with bootstrap CIs over seeds and the std over folds.

    Returns rows {metric, class, value, ci_low, ci_high, fold_std, chance}; class is "all" for the
    mean over classes and the class label for the per-class one-vs-rest ratios.
    """
    y, classes = oof["y"], oof["classes"]
    k = len(classes)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = g.max() + 1
    rng = np.random.default_rng(settings.seed)
    weights = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=settings.bootstrap).astype(float)
    lo_q, hi_q = 50 * (1 - settings.ci), 50 * (1 + settings.ci)
    rows = []
    for where in ("own", "other"):
        stats = _sufficient_stats(y, oof[f"multi_{where}"], oof[f"ovr_{where}"], k)
        per_group = np.zeros((n_groups, stats.shape[1]))
        np.add.at(per_group, g, stats)
        point = _metrics_from(per_group.sum(0), k)
        boot = _metrics_from(weights @ per_group, k)
        folds = [_metrics_from(stats[oof["fold"] == f].sum(0), k) for f in np.unique(oof["fold"])]
        names = METRIC_NAMES[where]
        chance = {"accuracy": 1 / k, "ratio": float("nan"), "balanced": 0.5}
        for key, name in names.items():
            lo, hi = np.nanpercentile(boot[key], [lo_q, hi_q])
            rows.append({"metric": name, "class": "all", "value": float(point[key]), "ci_low": float(lo),
                         "ci_high": float(hi), "fold_std": float(np.std([f[key] for f in folds], ddof=1)),
                         "chance": chance[key]})
        for c in range(k):
            lo, hi = np.nanpercentile(boot["per_class"][:, c], [lo_q, hi_q])
            rows.append({"metric": names["ratio"], "class": str(classes[c]), "value": float(point["per_class"][c]),
                         "ci_low": float(lo), "ci_high": float(hi),
                         "fold_std": float(np.nanstd([f["per_class"][c] for f in folds], ddof=1)),
                         "chance": float("nan")})
    return rows


def probe(X_own, X_other, labels, groups, settings: ProbeSettings | None = None) -> list[dict]:
    """Train on ``X_own`` with grouped CV; measure on held-out ``X_own`` and ``X_other``; add the shuffled control.

    Each row gets ``shuffled``, ``shuffled_ci_low``, ``shuffled_ci_high``: the same metric for probes
    trained on permuted labels.
    """
    settings = settings or ProbeSettings()
    check_design(labels, groups, settings.folds)
    X_own, X_other = np.asarray(X_own, dtype=np.float64), np.asarray(X_other, dtype=np.float64)
    if X_own.shape != X_other.shape or len(X_own) != len(labels):
        raise ProbeDataError(
            f"X_own {X_own.shape}, X_other {X_other.shape} and labels ({len(labels)}) must describe the same images"
        )
    real = summarise(out_of_fold(X_own, X_other, labels, groups, settings), groups, settings)
    control = summarise(out_of_fold(X_own, X_other, labels, groups, settings, shuffled=True), groups, settings)
    for r, c in zip(real, control):
        r.update(shuffled=c["value"], shuffled_ci_low=c["ci_low"], shuffled_ci_high=c["ci_high"])
    return real
