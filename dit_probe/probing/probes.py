"""Linear probes on attention maps (paper section 5.1, Fig. 7), with scikit-learn.

A probe is trained on the maps of one token (e.g. the colour word) to predict a label (the colour),
and then applied to the maps of another token of the same images (the object word): *transfer*.
If it still finds the label there, the other token's maps carry that information: *leakage*.
Transfer is measured three ways, by how the other token's maps are standardised (``TRANSFER``):
with the probe's own scaler, fitted on the training token's maps ("source": the original design,
which mixes a shift between the two tokens' map distributions with information), with a scaler fitted
on the other token's maps of the training fold ("own"), and with no scaler at all ("none").
A *direct* probe (``direct_probe``) is trained and tested on the same features, e.g. the object
word's maps: does that token carry the label at all, whether or not in the colour word's code?

- Cross-validation is grouped by seed: a test fold holds seeds the probe never saw, and the grid
  uses the same seeds for every label, so image layout cannot give the label away. Other groupings
  (by object, for features that do not change with the seed, like text-encoder outputs) pass other
  ``groups``; the bootstrap then resamples those groups.
- Two probe kinds, as in docs/design.md, section 5: a multiclass logistic regression (chance 1/K) and
  one-vs-rest binary logistic regressions with balanced class weights (Fig. 7's "ratio of maps
  classified as colour c"; balanced weights put an uninformed probe's ratio near 0.5).
- A shuffled-label control is the same procedure trained on permuted labels: the empirical chance.
- Confidence intervals: a percentile bootstrap over the groups (seeds) of the out-of-fold predictions
  (images of one seed move together); ``fold_std`` is the spread of the metric over the folds.
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

# metric names, by what the probe is measured on: "own" = held-out maps of the token the probe was
# trained on (does the probe work?); "other" = the other token's maps of the same images (transfer,
# scaler "source"); "other_own_scaler" = those maps standardised with their own training-fold statistics
# (scaler "own"); "*_no_scaler": a probe trained and applied without any scaler (scaler "none")
METRIC_NAMES = {
    "own": {"accuracy": "accuracy", "ratio": "ovr_ratio", "balanced": "ovr_balanced"},
    "other": {"accuracy": "leakage", "ratio": "ovr_leakage_ratio", "balanced": "ovr_leakage_balanced"},
    "other_own_scaler": {"accuracy": "leakage_own_scaler", "ratio": "ovr_leakage_own_scaler_ratio",
                         "balanced": "ovr_leakage_own_scaler_balanced"},
    "own_no_scaler": {"accuracy": "accuracy_no_scaler", "ratio": "ovr_no_scaler_ratio",
                      "balanced": "ovr_no_scaler_balanced"},
    "other_no_scaler": {"accuracy": "leakage_no_scaler", "ratio": "ovr_leakage_no_scaler_ratio",
                        "balanced": "ovr_leakage_no_scaler_balanced"},
}
TRANSFER = {"source": "leakage", "own": "leakage_own_scaler", "none": "leakage_no_scaler"}  # scaler -> accuracy metric


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


def check_design(labels, groups, folds: int, group_name: str = "seed") -> None:
    """Raise a clear error when grouped cross-validation cannot be run on these labels and groups
    (``group_name``: what a group is, for the messages)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ProbeDataError(f"a probe needs at least 2 classes; got {len(classes)} ({list(classes)})")
    if folds < 2:
        raise ProbeDataError(f"cross-validation needs folds >= 2; got folds={folds}")
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise ProbeDataError(
            f"too few samples for {folds}-fold cross-validation grouped by {group_name}: the data has {n_groups} "
            f"{group_name}(s). Generate at least {folds} {group_name}s, or lower folds (minimum 2)"
        )
    for c in classes:
        if len(np.unique(groups[labels == c])) < folds:
            raise ProbeDataError(
                f"class {c!r} occurs in fewer than {folds} {group_name}s, so some folds would have no test or training "
                "samples of it: use a full grid with the same seeds for every class"
            )


def _fit(X, y, C, max_iter, ovr: bool, scale: bool = True):
    base = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced" if ovr else None)
    model = make_pipeline(*([StandardScaler()] if scale else []), OneVsRestClassifier(base) if ovr else base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def _decisions(ovr, X) -> np.ndarray:
    """(n, K) one-vs-rest decisions; with 2 classes sklearn fits one classifier, for class 1 (class 0: its negation)."""
    d = ovr.decision_function(X)
    return np.column_stack([d < 0, d > 0]) if d.ndim == 1 else d > 0


def out_of_fold(X_own, X_other, labels, groups, settings: ProbeSettings, shuffled: bool = False) -> dict:
    """Out-of-fold predictions of the multiclass and one-vs-rest probes trained on ``X_own``.

    X_own, X_other: (n, features), the two tokens' maps of the same n images (X_other None: only the
    held-out ``X_own`` is measured, a direct probe); labels, groups: (n,).
    Returns integer label codes: ``y`` (n,), ``fold`` (n,), and for every measurement ``w`` of
    ``METRIC_NAMES`` that applies, ``multi_{w}`` (n,) and ``ovr_{w}`` (n, K) bool (each one-vs-rest
    classifier's decision).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes, y = np.unique(labels, return_inverse=True)
    n, k = len(y), len(classes)
    where = ["own"] if X_other is None else list(METRIC_NAMES)
    out = {"y": y, "classes": classes, "fold": np.zeros(n, int)}
    for w in where:
        out[f"multi_{w}"], out[f"ovr_{w}"] = np.zeros(n, int), np.zeros((n, k), bool)
    rng = np.random.default_rng(settings.seed + 1)
    for f, (train, test) in enumerate(GroupKFold(n_splits=settings.folds).split(X_own, y, groups)):
        y_train = rng.permutation(y[train]) if shuffled else y[train]
        scaled = [_fit(X_own[train], y_train, settings.C, settings.max_iter, ovr) for ovr in (False, True)]
        measured = {"own": (scaled, X_own[test])}  # measurement -> ((multiclass, one-vs-rest), test features)
        if X_other is not None:
            raw = [_fit(X_own[train], y_train, settings.C, settings.max_iter, ovr, scale=False) for ovr in (False, True)]
            # scaler "own": the other token's test maps standardised with the other token's training maps
            # (no labels used), then the same classifiers without their own scaler
            other_std = StandardScaler().fit(X_other[train]).transform(X_other[test])
            measured.update(other=(scaled, X_other[test]), other_own_scaler=([m[-1] for m in scaled], other_std),
                            own_no_scaler=(raw, X_own[test]), other_no_scaler=(raw, X_other[test]))
        out["fold"][test] = f
        for w, ((multi, ovr), X) in measured.items():
            out[f"multi_{w}"][test] = multi.predict(X)
            out[f"ovr_{w}"][test] = _decisions(ovr, X)
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
    """Metrics (see ``METRIC_NAMES``) with bootstrap CIs over the groups (seeds) and the std over folds.

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
    for where in [w for w in METRIC_NAMES if f"multi_{w}" in oof]:
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


def probe(X_own, X_other, labels, groups, settings: ProbeSettings | None = None, group_name: str = "seed") -> list[dict]:
    """Train on ``X_own`` with grouped CV; measure on held-out ``X_own`` and (unless None) on ``X_other``
    under each scaler of ``TRANSFER``; add the shuffled control.

    Each row gets ``shuffled``, ``shuffled_ci_low``, ``shuffled_ci_high``: the same metric for probes
    trained on permuted labels.
    """
    settings = settings or ProbeSettings()
    check_design(labels, groups, settings.folds, group_name)
    X_own = np.asarray(X_own, dtype=np.float64)
    X_other = None if X_other is None else np.asarray(X_other, dtype=np.float64)
    if len(X_own) != len(labels) or (X_other is not None and X_own.shape != X_other.shape):
        raise ProbeDataError(
            f"X_own {X_own.shape}, X_other {None if X_other is None else X_other.shape} and labels ({len(labels)}) "
            "must describe the same images"
        )
    for name, X in (("X_own", X_own), ("X_other", X_other)):
        if X is not None and not np.isfinite(X).all():
            raise ProbeDataError(f"{name} holds NaN or infinite features ({int((~np.isfinite(X)).sum())} values): maps "
                                 "of a layer or step that was not recorded are NaN; select recorded ones")
    real = summarise(out_of_fold(X_own, X_other, labels, groups, settings), groups, settings)
    control = summarise(out_of_fold(X_own, X_other, labels, groups, settings, shuffled=True), groups, settings)
    for r, c in zip(real, control):
        r.update(shuffled=c["value"], shuffled_ci_low=c["ci_low"], shuffled_ci_high=c["ci_high"])
    return real


def direct_probe(X, labels, groups, settings: ProbeSettings | None = None, name: str = "direct",
                 group_name: str = "seed") -> list[dict]:
    """A probe trained and tested on the same features ``X`` (grouped CV, CIs and shuffled control as
    ``probe``). Its metrics are named ``name``, ``ovr_{name}_ratio`` and ``ovr_{name}_balanced``."""
    rename = {"accuracy": name, "ovr_ratio": f"ovr_{name}_ratio", "ovr_balanced": f"ovr_{name}_balanced"}
    return [{**r, "metric": rename[r["metric"]]} for r in probe(X, None, labels, groups, settings, group_name)]
