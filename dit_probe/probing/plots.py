"""Figures of the probing study, drawn from its tidy table (and the datasets, for example maps)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

LABELS = {
    "ovr_ratio": "colour-token maps (held-out seeds)",
    "ovr_leakage_ratio": "object-token maps (leakage)",
    "ovr_direct_ratio": "object-token maps, direct probe",
}
BARS = (("ovr_ratio", "tab:blue"), ("ovr_leakage_ratio", "tab:red"), ("ovr_direct_ratio", "tab:orange"))


def _select(table, model, metric, direction="color", layer="mean", step="mean", cls="all"):
    t = table[(table.model == model) & (table.direction == direction) & (table.metric == metric)]
    if cls is not None:
        t = t[t["class"].astype(str) == cls]
    if layer is not None:
        t = t[t.layer == layer]
    if step is not None:
        t = t[t.step.astype(str) == str(step)]
    return t


def _err(t):
    return np.vstack([t.value - t.ci_low, t.ci_high - t.value])


def plot_fig7(table: pd.DataFrame):
    """Fig. 7 of the paper: per colour c, the share of maps that the one-vs-rest probe for c classifies as c,
    on held-out colour-token maps and on object-token maps of the same images, and (a control) the share
    for a probe trained and tested on object-token maps (maps pooled over layers and steps; bars: 95%
    bootstrap CI over seeds; grey ticks: the shuffled-label control)."""
    models = list(dict.fromkeys(table.model))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        own = _select(table, model, "ovr_ratio", cls=None)
        classes = [c for c in dict.fromkeys(own["class"].astype(str)) if c != "all"]
        x = np.arange(len(classes))
        width = 0.8 / len(BARS)
        for i, (metric, color) in enumerate(BARS):
            t = pd.concat([_select(table, model, metric, cls=c) for c in classes])
            dx = (i - (len(BARS) - 1) / 2) * width
            ax.bar(x + dx, t.value, width, yerr=_err(t), color=color, alpha=0.8, capsize=2, label=LABELS[metric])
            ax.scatter(x + dx, t.shuffled, marker="_", s=120 * width / 0.38, color="0.3", zorder=3,
                       label="shuffled-label control" if i == 0 else None)
        ax.axhline(0.5, color="0.5", ls="--", lw=0.8)
        bal = _select(table, model, "ovr_leakage_balanced").iloc[0]
        ax.set_title(f"{model}\nleakage balanced acc. {bal.value:.2f} [{bal.ci_low:.2f}, {bal.ci_high:.2f}], "
                     f"shuffled {bal.shuffled:.2f}", fontsize=9)
        ax.set_xticks(x, classes, rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("share classified as the true colour")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_layers_steps(table: pd.DataFrame, direction: str = "color"):
    """Probe accuracy (own maps) and leakage (other token's maps) per step for every layer, and per layer
    pooled over steps. Multiclass probes; dotted: chance; grey: the shuffled-label control."""
    models = list(dict.fromkeys(table.model))
    fig, axes = plt.subplots(3, len(models), figsize=(5.2 * len(models), 9), squeeze=False)
    for j, model in enumerate(models):
        for i, metric in enumerate(("accuracy", "leakage")):
            ax = axes[i, j]
            t = _select(table, model, metric, direction, layer=None, step=None)
            t = t[t.step.astype(str) != "mean"]
            layers = list(dict.fromkeys(t.layer))
            cmap = plt.get_cmap("viridis")
            for k, layer in enumerate(layers):
                u = t[t.layer == layer]
                steps = u.step.astype(int)
                pooled = layer == "mean"
                ax.plot(steps, u.value, color="k" if pooled else cmap(k / max(1, len(layers) - 2)),
                        lw=2.2 if pooled else 1.0, marker="o" if pooled else None, ms=3,
                        label="pooled over layers" if pooled else layer)
                if pooled:
                    ax.fill_between(steps, u.ci_low, u.ci_high, color="k", alpha=0.15)
                    ax.plot(steps, u.shuffled, color="0.6", lw=1.2, ls="-.", label="shuffled control (pooled)")
            ax.axhline(t.chance.iloc[0], color="0.5", ls=":", lw=1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("denoising step")
            what = "probe accuracy on held-out own-token maps" if metric == "accuracy" else "leakage onto the other token's maps"
            ax.set_title(f"{model}: {what}", fontsize=9)
            if j == 0:
                ax.set_ylabel(metric)
        axes[0, j].legend(fontsize=6, ncol=2)
        ax = axes[2, j]
        rows = []
        for metric in ("accuracy", "leakage"):
            t = _select(table, model, metric, direction, layer=None, step="mean")
            rows.append(t.set_index("layer"))
        layers = list(rows[0].index)
        x = np.arange(len(layers))
        for i, (t, color) in enumerate(zip(rows, ("tab:blue", "tab:red"))):
            t = t.loc[layers]
            ax.bar(x + (i - 0.5) * 0.38, t.value, 0.38, yerr=_err(t), color=color, alpha=0.8, capsize=2,
                   label=("accuracy (own token)", "leakage (other token)")[i])
            ax.scatter(x + (i - 0.5) * 0.38, t.shuffled, marker="_", s=100, color="0.3", zorder=3)
        ax.axhline(rows[0].chance.iloc[0], color="0.5", ls=":", lw=1)
        ax.set_xticks(x, layers, rotation=30, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{model}: per layer, maps pooled over steps", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{direction} probes: multiclass logistic regression, 95% bootstrap CI over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def plot_example_maps(datasets: dict, obj: str, seed: int, normalise: str = "sum"):
    """Rows: colours; per model three columns: the image, the colour word's map, the object word's map
    (pooled over layers and steps, one colour scale per map)."""
    models = list(datasets)
    first = datasets[models[0]]
    colors = list(dict.fromkeys(first.colors))
    fig, axes = plt.subplots(len(colors), 3 * len(models), figsize=(1.25 * 3 * len(models), 1.3 * len(colors)),
                             squeeze=False)
    for j, model in enumerate(models):
        data = datasets[model]
        for i, color in enumerate(colors):
            idx = np.flatnonzero((data.colors == color) & (data.objects == obj) & (data.seeds == seed))
            cells = axes[i, 3 * j: 3 * j + 3]
            for ax in cells:
                ax.set_xticks([]), ax.set_yticks([])
            if not len(idx):
                continue
            n = idx[0]
            cells[0].imshow(data.images[n])
            for ax, token in zip(cells[1:], ("color", "object")):
                m = data.features(token, None, None, normalise)[n].reshape(data.meta["grid"])
                ax.imshow(m, cmap="magma")
            if i == 0:
                for ax, title in zip(cells, (model, "colour word", f"'{obj}'")):
                    ax.set_title(title, fontsize=8)
            cells[0].set_ylabel(color, fontsize=8)
    fig.suptitle(f"'a <colour> {obj}', seed {seed}: maps pooled over layers and steps", fontsize=9)
    fig.tight_layout()
    return fig


def figures(table, datasets, example_object, example_seed) -> dict:
    """The study's three figures by file name (the controls table is made by the study)."""
    return {"probing-fig7.png": plot_fig7(table), "probing-layers-steps.png": plot_layers_steps(table),
            "probing-example-maps.png": plot_example_maps(datasets, example_object, example_seed)}
