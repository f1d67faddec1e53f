"""h-space PCA on the toy pair (issue 18): how much of each ground-truth attribute do the top principal
components of a hidden state explain, per model, site and noise level?

Rendered toy scenes (exact attributes and object position) are encoded, noised to the level (a nominal
strength or a log-SNR matched per model, ``studies.levels``) with one noise sample per scene, and the
denoiser is called once (no CFG) while ``record_states`` keeps the site's state: under the full caption,
and under the empty prompt. The caption names every categorical attribute, so under it an attribute can
be explained by the text alone; under the empty prompt only the noised image can carry it.
The states (scenes x flattened state) get a PCA; for every component and attribute the share of the
component's variance the attribute explains: the correlation ratio eta² for the categorical attributes
(colour, shape, size, background), r² for the object's x and y. Each value has a 95% bootstrap interval
over scenes (the PCA fitted once) and a shuffled-label control (the same statistic with the attribute
permuted across scenes, mean of 50 permutations), which is what eta² reaches by chance with this many
scenes and classes.

Results: ``rows.csv`` (model, level, site, component, explained variance, attribute, value, CI,
shuffled), ``table.md`` (per attribute its best component and value), ``hspace-pca.png`` (heat maps of
components x attributes). One unit per (model, level), cached by ``studies.runner``.

    dit-probe run hspace --config experiments/hspace-toy.yaml
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F

from ..editing import EIMEditor
from ..editing.hspace import pca_directions
from ..hidden import record_states
from ..registry import load_pipeline
from ..toyworld.world import render_many, scenes
from .levels import LEVEL_AXES, LevelSettings, apply_level, with_level
from .runner import Report, Study, Unit

CATEGORICAL = ("color", "shape", "size", "background")
CONTINUOUS = ("x", "y")


class HSpaceConfig(LevelSettings):
    models: list[str] = ["toy-mmdit", "toy-unet"]
    # hidden sites per model; a model not listed uses its family's middle: the UNet bottleneck, a DiT's
    # middle block's image stream
    sites: dict[str, list[str]] = {"toy-mmdit": ["block.01.image", "block.02.image"], "toy-unet": ["mid.out"]}
    strengths: list[float] = []
    log_snrs: list[float] = [-3.0]
    n: int = 200  # scenes
    seed: int = 0
    components: int = 6
    bootstrap: int = 1000
    num_inference_steps: int | None = None
    prompts: list[str] = ["full", "empty"]  # the caption, or the empty prompt (the image alone)
    REPORT_ONLY = ()  # the bootstrap runs inside each unit here, so its size is part of the unit's settings
    # real models: average-pool the state's positions to pool x pool before the PCA (None: keep every
    # position), and at most batch_size scenes per denoiser call (None: all at once)
    pool: int | None = None
    batch_size: int | None = None

    def check(self):
        super().check()
        bad = [p for p in self.prompts if p not in ("full", "empty")]
        if bad:
            raise ValueError(f"unknown prompt kind(s) {bad}: 'full' (the caption) or 'empty'")
        if self.n <= self.components + 1:
            raise ValueError(f"n ({self.n} scenes) must exceed components + 1 ({self.components + 1}) for a PCA")


def eta_squared(scores: np.ndarray, labels: np.ndarray) -> float:
    """Between-class variance over total variance of ``scores`` (the correlation ratio)."""
    total = ((scores - scores.mean()) ** 2).sum()
    if total == 0:
        return float("nan")
    between = sum((labels == g).sum() * (scores[labels == g].mean() - scores.mean()) ** 2 for g in np.unique(labels))
    return float(between / total)


def r_squared(scores: np.ndarray, values: np.ndarray) -> float:
    return float(np.corrcoef(scores, values)[0, 1] ** 2)


def _statistic(attribute):
    return eta_squared if attribute in CATEGORICAL else r_squared


def _setup(cfg: HSpaceConfig, model: str, shared) -> SimpleNamespace:
    pipe = load_pipeline(model)
    size = EIMEditor(pipe).size
    items = scenes(cfg.n, cfg.seed)
    truth = {a: np.array([getattr(s, a) for s in items]) for a in CATEGORICAL}
    truth.update(x=np.array([s.cx for s in items]), y=np.array([s.cy for s in items]))
    return SimpleNamespace(pipe=pipe, images=render_many(items, size), captions=[s.caption() for s in items],
                           truth=truth)


def _sites(cfg: HSpaceConfig, pipe, model: str) -> list[str]:
    if model in cfg.sites:
        return list(cfg.sites[model])
    names = [h.name for h in EIMEditor(pipe).adapter.hidden_sites()]
    if "mid.out" in names:
        return ["mid.out"]
    image = [n for n in names if n.endswith(".image")]
    return [image[len(image) // 2]]


def pooling(size: int):
    """A ``record_states`` reduction: the state's positions average-pooled to size x size (a token state
    is laid out on its square grid first), so a 1024² model's states fit in memory for the PCA."""
    def reduce(h):
        if h.ndim == 3:  # (rows, tokens, C) on a square token grid
            side = math.isqrt(h.shape[1])
            if side * side != h.shape[1]:
                raise ValueError(f"pool needs a square token grid; the state has {h.shape[1]} tokens")
            h = h.view(len(h), side, side, -1).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(h, size)
    return reduce


def _compute(ctx, unit: Unit, cfg: HSpaceConfig):
    editor = EIMEditor(ctx.pipe, num_inference_steps=cfg.num_inference_steps, guidance_scale=1.0)
    level = apply_level(editor, unit["level"])
    sites = _sites(cfg, ctx.pipe, unit.model)
    prompts = ctx.captions if unit["prompt"] == "full" else [""] * cfg.n
    enc = editor.encode(ctx.images, prompts, seeds=list(range(cfg.seed, cfg.seed + cfg.n)))
    reduce = "keep" if cfg.pool is None else pooling(cfg.pool)
    rows_per_call = cfg.batch_size or cfg.n
    chunks = []
    for lo in range(0, cfg.n, rows_per_call):  # one reader per call: a second call at one timestep would
        part = slice(lo, lo + rows_per_call)    # read as another guidance branch (SD3's skip-layer guidance)
        with torch.no_grad(), record_states(ctx.pipe, sites, tokens=reduce, branch="both") as states:
            editor.adapter.eps(enc.zt[part], enc.t, enc.cond.map(lambda x: x[part]), 1.0)
        chunks.append(states)
    states = {site: torch.cat([c[site] for c in chunks], dim=1) for site in sites}
    rng = np.random.default_rng(cfg.seed)
    boots = [rng.integers(0, cfg.n, cfg.n) for _ in range(cfg.bootstrap)]
    perms = [rng.permutation(cfg.n) for _ in range(50)]
    rows = []
    for site in sites:
        x = states[site][0].flatten(1)  # (scenes, features): the one call's state
        comps, ratio = pca_directions(x, k=cfg.components)
        scores = ((x.double() - x.double().mean(0)) @ comps.double().T).numpy()  # (scenes, components)
        for j in range(cfg.components):
            s = scores[:, j]
            for attribute, values in ctx.truth.items():
                stat = _statistic(attribute)
                boot = [stat(s[b], values[b]) for b in boots]
                rows.append(dict(site=site, component=j + 1, explained=float(ratio[j]), attribute=attribute,
                                 value=stat(s, values), ci_low=float(np.nanpercentile(boot, 2.5)),
                                 ci_high=float(np.nanpercentile(boot, 97.5)),
                                 shuffled=float(np.mean([stat(s, values[p]) for p in perms]))))
    frame = with_level(pd.DataFrame(rows), level)
    frame.insert(0, "prompt", unit["prompt"])
    frame.insert(0, "model", unit.model)
    return frame, None


def best_components(rows: pd.DataFrame) -> pd.DataFrame:
    """Per model, level, site and attribute: the component that explains it most, and how many of the top
    components explain more than 10% of their variance by it."""
    keys = ["model", "level", "prompt", "site", "attribute"]
    best = rows.loc[rows.groupby(keys)["value"].idxmax()].set_index(keys)
    best["components_over_10pct"] = rows.assign(over=rows.value > 0.1).groupby(keys)["over"].sum()
    return best.reset_index()


def _table(best: pd.DataFrame) -> str:
    lines = ["| model | level | prompt | site | attribute | best component (variance share) | eta² / r² [95% CI] | "
             "shuffled | components > 10% |", "|---|---|---|---|---|---|---|---|---|"]
    for r in best.itertuples():
        lines.append(f"| {r.model} | {r.level} (log-SNR {r.log_snr:.1f}) | {r.prompt} | {r.site} | {r.attribute} | {r.component} "
                     f"({r.explained:.0%}) | {r.value:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] | {r.shuffled:.2f} | "
                     f"{r.components_over_10pct} |")
    return "\n".join(lines) + "\n"


def _figure(rows: pd.DataFrame):
    panels = rows[["model", "site", "prompt"]].drop_duplicates().values.tolist()
    levels = list(dict.fromkeys(rows.level))
    fig, axes = plt.subplots(len(levels), len(panels), figsize=(2.6 * len(panels), 2.4 * len(levels)), squeeze=False)
    for (i, level), (j, (model, site, prompt)) in ((a, b) for a in enumerate(levels) for b in enumerate(panels)):
        ax = axes[i, j]
        sub = rows[(rows.model == model) & (rows.level == level) & (rows.site == site) & (rows.prompt == prompt)]
        grid = sub.pivot(index="component", columns="attribute", values="value")[list(CATEGORICAL + CONTINUOUS)]
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", cbar=False,
                    annot_kws={"fontsize": 6})
        ax.set_title(f"{model} {site}\n{prompt} prompt, {level}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel(""), ax.set_ylabel("component" if j == 0 else "")
    fig.suptitle("share of each principal component's variance explained by each attribute (eta² / r²)", fontsize=8)
    fig.tight_layout()
    return fig


def _report(cfg: HSpaceConfig, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    best = best_components(rows)
    table = _table(best)
    return Report(best, files={"rows.csv": rows, "best.csv": best, "table.md": table},
                  figures={"hspace-pca.png": _figure(rows), "hspace-pca-table.md": table}, text=table)


def _line(frame: pd.DataFrame) -> str:
    top = frame.loc[frame.groupby(["site", "attribute"])["value"].idxmax()]
    return "best eta²/r²: " + ", ".join(f"{r.attribute} {r.value:.2f}" for r in top.itertuples())


STUDY = Study(
    name="hspace", help="h-space PCA: attributes explained by the top components of a hidden state (issue 18)",
    config=HSpaceConfig,
    units=lambda cfg: [Unit(m, (("level", lv), ("prompt", p))) for m in cfg.models for lv in cfg.levels()
                       for p in cfg.prompts],
    setup=_setup, compute=_compute, report=_report, axes=("models", "prompts", *LEVEL_AXES),
    paper="h-space seed: PCA directions vs ground-truth attributes (toy pair)", toy_config="hspace-toy.yaml", paper_config="hspace-paper.yaml",
    figure_files=("hspace-pca.png", "hspace-pca-table.md"), summary_line=_line,
)
run, config_from = STUDY.run, STUDY.config_from
