"""Alpha-threshold study (paper section 5.2, Fig. 10): how far can an edit go along its direction
before other attributes change?

For edits of one attribute (toy: source render, target caption, target phrase, as in the toy editing
study; CelebA: one binary attribute flipped, read by the CLIP judge) and a direction from the editor (eim: text + HSDS; prompt-only: text; hsds-only: HSDS), alpha
sweeps a grid that includes negative values. Per alpha the judge reads every image:

- ``target_score``: P(target value), and ``success``: the target value is read;
- ``changed_<attr>``: every other attribute read differently than at alpha = 0 (the same edit's plain
  reconstruction, so reconstruction error is not counted as collateral), and ``collateral``: their mean;
- ``background_psnr`` / ``background_ssim`` against the source over pixels that are background in both
  renders (toy; CelebA has no masks, so the whole image is scored and ``masked`` is False).

Thresholds per (model, mode, attribute): the alpha at which success first reaches 50%, and the alpha at
which collateral first exceeds ``tolerance`` on each side of 0 (linear interpolation between grid points;
none when it never does). The latent's projection on the direction: with u = n / ||n||, the noised
latent moves along u by alpha ||n||; ``projection_z`` standardises that position against the other
edits' latents projected on the same u (a null distribution: how many standard deviations out of the
data an edit pushes), and ``alpha_match`` = the alpha at which the projection equals that of the target
render noised with the same sample (image side), 1 by construction on the text side.

Results: ``alphas.csv`` (one row per edit and alpha), ``summary.csv``, ``thresholds.csv``, ``table.md``,
and figures (curves, projections, an example strip); one unit per (model, mode, attribute), run and
cached by ``studies.runner``.

    dit-probe run alpha-threshold
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..stats import mean_ci
from .levels import LEVEL_AXES, LEVEL_COLUMNS, apply_level, plot_against_log_snr, with_level
from .runner import Report, Study, Unit
from .sources import EditSourceSettings, check_modes, edit_set, judge_edits, source_for


class AlphaThresholdConfig(EditSourceSettings):
    attributes: list[str] = ["color", "size", "shape"]
    modes: list[str] = ["eim", "prompt-only"]
    n: int = 20  # edits per attribute
    alphas: list[float] = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    tolerance: float = 0.1  # collateral change (fraction of other attributes read differently) that counts
    seed: int = 1  # scenes and noise (the toy editing study uses 0: these are other edits)
    batch_size: int | None = None

    REPORT_ONLY = ("bootstrap", "tolerance")

    def check(self):
        super().check()
        self.check_editable(self.attributes)
        check_modes(self.modes)
        alphas = [float(a) for a in self.alphas]
        if 0.0 not in alphas or not any(a < 0 for a in alphas) or not any(a > 0 for a in alphas):
            raise ValueError(f"alphas must include 0 (the reference for collateral change), negative and positive "
                             f"values; got {self.alphas}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance is a fraction of attributes in (0, 1), got {self.tolerance}")
        if self.n < 3:
            raise ValueError(f"n must be >= 3 edits (the projection's null distribution needs the others), got {self.n}")


def crossing(alphas, values, level: float, side: int = 1, inclusive: bool = False) -> float:
    """The alpha nearest 0 on one side (side=+1: alpha >= 0; -1: alpha <= 0) where ``values`` first
    exceeds ``level`` (reaches it when ``inclusive``), linearly interpolated between that grid point and
    the one before. NaN when it never does; 0 when it already does at alpha 0."""
    a = np.asarray(alphas, float)
    v = np.asarray(values, float)
    keep = a * side >= 0
    order = np.argsort(a[keep] * side)
    a, v = a[keep][order], v[keep][order]
    above = v >= level if inclusive else v > level
    if not above.any():
        return float("nan")
    k = int(np.argmax(above))
    if k == 0:
        return float(a[0])
    a0, a1, v0, v1 = a[k - 1], a[k], v[k - 1], v[k]
    return float(a0 + (level - v0) / (v1 - v0) * (a1 - a0)) if v1 != v0 else float(a1)


def projections(enc, direction, alphas, target_enc=None) -> dict[str, np.ndarray]:
    """Where the manipulated latent sits along each edit's direction. Uses the image side when there is
    one, else the text side. Returns ``z`` (edits, alphas): the standardised projection, ``alpha_match``
    (edits,) and the side used."""
    if direction.image is not None:
        side, base, n = "image", enc.zt, direction.image_at(1.0)
        target = target_enc.zt if target_enc is not None else None
    else:
        side, base, n = "text", enc.cond.embeds, direction.text_embeds
        target = None
    base = base.flatten(1).double()
    n = n.flatten(1).double()
    norm = n.norm(dim=1)
    u = n / norm[:, None]
    null = u @ base.T  # (edits, edits): every latent projected on every edit's direction
    own = null.diagonal()
    others = ~np.eye(len(u), dtype=bool)
    mu = np.array([null[b].numpy()[others[b]].mean() for b in range(len(u))])
    sd = np.array([null[b].numpy()[others[b]].std(ddof=1) for b in range(len(u))])
    a = np.asarray(alphas, float)
    pos = own.numpy()[:, None] + a[None] * norm.numpy()[:, None]
    if target is not None:
        match = (((u * target.flatten(1).double()).sum(1) - own) / norm).numpy()
    else:
        match = np.ones(len(u)) if side == "text" else np.full(len(u), np.nan)
    return {"z": (pos - mu[:, None]) / sd[:, None], "alpha_match": match, "side": side,
            "norm": norm.numpy()}


def run_unit(editor, source, attribute: str, mode: str, cfg: AlphaThresholdConfig) -> tuple[pd.DataFrame, np.ndarray]:
    e = edit_set(source, attribute, cfg.n, cfg.seed, editor.size)
    seeds = [cfg.seed * 100_000 + i for i in range(cfg.n)]
    captions = [source.caption(lab) for lab in e["sources"]]
    targets = [source.caption(lab) for lab in e["targets"]]
    enc = editor.encode(e["rgb"], captions, seeds)
    direction = editor.identify(enc, targets, mode, e["phrases"], alphas=cfg.alphas)
    images = editor.manipulate(enc, direction, cfg.alphas)
    frame = pd.DataFrame(judge_edits(source.judge, images, e["sources"], e["targets"], attribute, cfg.alphas,
                                     e["rgb"], e["masks"]))
    target_enc = None
    if direction.image is not None and e["target_rgb"] is not None:
        target_enc = editor.encode(e["target_rgb"], targets, seeds)  # the same noise as the sources
    proj = projections(enc, direction, cfg.alphas, target_enc)
    others = [x for x in source.values if x != attribute]
    at0 = frame[frame.alpha == 0.0].set_index("edit")
    for x in others:
        frame[f"changed_{x}"] = frame[f"read_{x}"].values != at0.loc[frame.edit, f"read_{x}"].values
    frame["collateral"] = frame[[f"changed_{x}" for x in others]].mean(axis=1)
    frame["projection_z"] = proj["z"].reshape(-1)  # rows are edit-major, alpha-minor
    frame["alpha_match"] = np.repeat(proj["alpha_match"], len(cfg.alphas))
    frame["projection_side"] = proj["side"]
    frame["masked"] = e["target_rgb"] is not None  # False: PSNR/SSIM over the whole image
    frame.insert(0, "attribute", attribute)
    frame.insert(0, "mode", mode)
    return frame, images[0]


def summarise(rows: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    out = []
    changed = [c for c in rows.columns if c.startswith("changed_")]
    keys = ["model", "level", "mode", "attribute", "alpha"]
    for key, g in rows.groupby(keys, sort=False):
        row = {**dict(zip(keys, key)), **g.iloc[0][LEVEL_COLUMNS[1:]].to_dict(), "n": len(g)}
        for m in ["target_score", "success", "collateral", "background_psnr", "background_ssim"]:
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        for c in changed:
            row[c] = float(g[c].astype(float).mean()) if g[c].notna().any() else np.nan
        row["projection_z"] = float(g.projection_z.mean())
        out.append(row)
    return pd.DataFrame(out)


def thresholds(summary: pd.DataFrame, rows: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    out = []
    for (model, level, mode, attr), g in summary.groupby(["model", "level", "mode", "attribute"], sort=False):
        g = g.sort_values("alpha")
        r = rows[(rows.model == model) & (rows.level == level) & (rows["mode"] == mode) & (rows.attribute == attr)]
        pos = crossing(g.alpha, g.collateral, tolerance, +1)
        z_at = np.interp(pos, g.alpha, g.projection_z) if np.isfinite(pos) else np.nan
        out.append({"model": model, "mode": mode, "attribute": attr, **g.iloc[0][LEVEL_COLUMNS].to_dict(),
                    "tolerance": tolerance,
                    "success_alpha": crossing(g.alpha, g.success, 0.5, +1, inclusive=True),
                    "collateral_alpha": pos, "collateral_alpha_negative": crossing(g.alpha, g.collateral, tolerance, -1),
                    "projection_z_at_threshold": z_at,
                    "alpha_match_median": float(np.nanmedian(r.drop_duplicates("edit").alpha_match))
                    if r.alpha_match.notna().any() else np.nan,
                    "projection_side": r.projection_side.iloc[0]})
    return pd.DataFrame(out)


def markdown_table(th: pd.DataFrame, summary: pd.DataFrame) -> str:
    def fmt(v):
        return "never" if not np.isfinite(v) else f"{v:+.2f}"

    lines = [f"| attribute | mode | log-SNR | model | success ≥ 50% at α | collateral > {th.tolerance.iloc[0]:.0%} at α (+) | "
             "at α (−) | collateral at α=1 | at α=max | projection z at the threshold | α matching the target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    top = summary.alpha.max()
    for r in th.sort_values(["attribute", "mode", "log_snr", "model"]).itertuples():
        g = summary[(summary.model == r.model) & (summary.level == r.level) & (summary["mode"] == r.mode)
                    & (summary.attribute == r.attribute)]
        c1 = g[g.alpha == 1.0].collateral
        cm = g[g.alpha == top].collateral
        match = "–" if not np.isfinite(r.alpha_match_median) else f"{r.alpha_match_median:.2f} ({r.projection_side})"
        zt = "–" if not np.isfinite(r.projection_z_at_threshold) else f"{r.projection_z_at_threshold:.1f}"
        star = " *" if r.paper_start else ""
        lines.append(f"| {r.attribute} | {r.mode} | {r.log_snr:.2f}{star} | {r.model} | {fmt(r.success_alpha)} | {fmt(r.collateral_alpha)} | "
                     f"{fmt(r.collateral_alpha_negative)} | {c1.iloc[0]:.0%} | {cm.iloc[0]:.0%} (α={top:g}) | {zt} | {match} |"
                     if len(c1) else "")
    lines += ["", "log-SNR: where the edit starts on that model's schedule (* = the paper's strength 0.75 starts there)."]
    return "\n".join(line for line in lines if line) + "\n"


def plot_curves(summary: pd.DataFrame, th: pd.DataFrame, rows: pd.DataFrame, tolerance: float):
    """Fig. 10-style: target score and collateral change vs alpha, background preservation vs alpha,
    and where the latent sits along the direction (projection z) vs collateral."""
    models = list(dict.fromkeys(summary.model))
    attrs = list(dict.fromkeys(summary.attribute))
    colours = dict(zip(attrs, plt.cm.tab10.colors))
    dashes = dict(zip(dict.fromkeys(summary["mode"]), ["-", "--", ":", "-."]))
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 3.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        sm = summary[summary.model == model]
        for (mode, attr), g in sm.groupby(["mode", "attribute"], sort=False):
            g = g.sort_values("alpha")
            c, ls = colours[attr], dashes[mode]
            axes[i, 0].plot(g.alpha, g.target_score, ls, color=c, marker="o", ms=3, label=f"{attr} target ({mode})")
            axes[i, 0].plot(g.alpha, g.collateral, ls, color=c, marker="x", ms=4, alpha=0.6)
            axes[i, 1].plot(g.alpha, g.background_psnr, ls, color=c, marker="o", ms=3, label=f"{attr} ({mode})")
            axes[i, 2].plot(g.projection_z, g.collateral, ls, color=c, marker="o", ms=3, label=f"{attr} ({mode})")
        for r in th[th.model == model].itertuples():
            if np.isfinite(r.collateral_alpha):
                axes[i, 0].axvline(r.collateral_alpha, color=colours[r.attribute], lw=0.8, ls=dashes[r.mode], alpha=0.5)
        axes[i, 0].axhline(tolerance, color="k", lw=0.6, ls=":")
        axes[i, 0].set_ylim(-0.02, 1.02)
        axes[i, 0].set(xlabel="alpha", ylabel="P(target) (o) / collateral change (x)",
                       title=f"{model}: target and collateral; vertical = threshold")
        axes[i, 1].set(xlabel="alpha", ylabel="background PSNR (dB)", title=f"{model}: background preservation")
        axes[i, 2].axhline(tolerance, color="k", lw=0.6, ls=":")
        axes[i, 2].set(xlabel="latent projection on the direction (z vs other latents)", ylabel="collateral change",
                       title=f"{model}: collateral vs distance along the direction")
        for ax in axes[i]:
            ax.title.set_fontsize(9)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_strips(strips: dict, alphas):
    """One example edit per (model, attribute, mode): its images across alphas."""
    keys = list(strips)
    fig, axes = plt.subplots(len(keys), len(alphas), figsize=(1.0 * len(alphas) + 1.2, 1.05 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        for c, a in enumerate(alphas):
            ax = axes[r, c]
            ax.imshow(strips[key][c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"α={a:g}", fontsize=7)
            if c == 0:
                ax.set_ylabel(key.replace(" ", "\n"), fontsize=5.5)
    fig.tight_layout(pad=0.2)
    return fig


def _compute(ctx, unit: Unit, cfg: AlphaThresholdConfig):
    editor, source = ctx
    level = apply_level(editor, unit["level"])
    frame, strip = run_unit(editor, source, unit["attribute"], unit["mode"], cfg)
    return with_level(frame, level), {"images": strip}


def _report(cfg: AlphaThresholdConfig, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    strips = {f"{r.unit.model} {r.unit['attribute']} {r.unit['mode']}": r.arrays["images"] for r in results
              if bool(r.frame.paper_start.iloc[0])}  # the examples at the paper's strength
    summary = summarise(rows, cfg.bootstrap)
    th = thresholds(summary, rows, cfg.tolerance)
    table = markdown_table(th, summary)
    paper = summary.paper_start.astype(bool)
    return Report(th, files={"alphas.csv": rows, "summary.csv": summary, "thresholds.csv": th, "table.md": table},
                  figures={"alpha-threshold-curves.png": plot_curves(summary[paper], th[th.paper_start.astype(bool)],
                                                                     rows, cfg.tolerance),
                           "alpha-threshold-levels.png": plot_against_log_snr(
                               summary[summary.alpha == 1.0], "collateral", "attribute", "mode",
                               "collateral change at α = 1"),
                           "alpha-threshold-examples.png": plot_strips(strips, [float(a) for a in cfg.alphas]),
                           "alpha-threshold-table.md": table}, text=table)


STUDY = Study(
    name="alpha-threshold",
    help="target and collateral change vs edit degree alpha, thresholds, projections (Fig. 10)",
    config=AlphaThresholdConfig,
    units=lambda cfg: [Unit(m, (("mode", mode), ("attribute", a), ("level", lv))) for m in cfg.models
                       for mode in cfg.modes for a in cfg.attributes for lv in cfg.levels()],
    prepare=lambda cfg, out: source_for(cfg, every_attribute=True), setup=lambda cfg, model, source: (cfg.editor(model, batch_size=cfg.batch_size), source),
    compute=_compute, report=_report, axes=("models", "modes", "attributes", *LEVEL_AXES),
    paper="Fig. 10: edit degree alpha vs collateral change", toy_config="alpha-threshold-toy.yaml",
    paper_config="alpha-threshold-paper.yaml",
    revision=3,  # 2: the HSDS restraint pulls towards z_t under every sign (issue 15); 3: noise levels
    figure_files=("alpha-threshold-curves.png", "alpha-threshold-levels.png", "alpha-threshold-examples.png",
                  "alpha-threshold-table.md"),
    summary_line=lambda f: "collateral by alpha: " + " ".join(
        f"{a:g}:{v:.2f}" for a, v in f.groupby("alpha").collateral.mean().items()),
)
run, config_from = STUDY.run, STUDY.config_from
