"""Two ablations of the image-side direction, on toy edits judged exactly (default) or on CelebA
edits judged by CLIP (``source: celeba``).

- **Fig. 11, lambda and step size** (``dit-probe run hsds-ablation``): HSDS with every lambda in
  ``lams`` and every starting step size in ``eta_starts`` (decaying to a tenth of it). By default the
  edits use the image side alone (mode hsds-only), so the text side, which already edits the toy
  world by itself, does not mask the effect of the settings.
- **Fig. 12, SDS guided by the target vs the source prompt** (``dit-probe run sds-guidance``): the SDS
  direction distilled towards the target phrase (e.g. 'a blue shape') or towards the source caption,
  applied on the image side alone.

Per setting and alpha: the judge's P(target), success, whether every other attribute is kept, and
background PSNR (exact masks on the toy world; the whole image on CelebA). Results: ``rows.csv``,
``summary.csv``, ``table.md`` and a figure; one unit per (model, setting), run and cached by
``studies.runner``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..editing import DistillSettings, EIMEditor
from ..registry import load_pipeline
from ..stats import mean_ci
from ..toyworld import Judge
from .levels import LEVEL_AXES, LEVEL_COLUMNS, LevelSettings, apply_level
from .runner import Report, Study, Unit
from .sources import EDITABLE, EditSourceSettings, edit_batch, edit_set, judge_edits, source_for


class HSDSAblationConfig(EditSourceSettings):
    attributes: list[str] = ["size", "color"]
    mode: str = "hsds-only"  # or eim: the text side as well
    lams: list[float] = [0.1, 0.5, 1.0]
    eta_starts: list[float] = [0.05, 0.2]
    iterations: int = 20
    n: int = 8  # edits per attribute
    alphas: list[float] = [0.0, 1.0, 1.5]
    seed: int = 2

    def check(self):
        super().check()
        self.check_editable(self.attributes)
        if self.mode not in ("hsds-only", "eim"):
            raise ValueError(f"mode must be 'hsds-only' or 'eim' (the modes that use HSDS), got {self.mode!r}")
        if not self.lams or not self.eta_starts or min(self.eta_starts) <= 0 or min(self.lams) < 0:
            raise ValueError("give lams >= 0 and eta_starts > 0")


class SDSGuidanceConfig(EditSourceSettings):
    attributes: list[str] = ["color", "size", "shape"]
    guides: list[str] = ["target", "source"]
    n: int = 12
    alphas: list[float] = [0.0, 1.0, 1.5]
    seed: int = 3

    def check(self):
        super().check()
        self.check_editable(self.attributes)
        bad = [g for g in self.guides if g not in ("target", "source")]
        if bad:
            raise ValueError(f"guides {bad}: choose 'target' (the target phrase) and/or 'source' (the source caption)")


def _edit_rows(editor, source, attribute, n, seed, alphas, mode, phrases_from="target", image_only=False):
    """Judge rows for n edits of one attribute (the alpha-threshold study's edits: toy or CelebA)."""
    e = edit_set(source, attribute, n, seed, editor.size)
    captions = [source.caption(lab) for lab in e["sources"]]
    enc = editor.encode(e["rgb"], captions, [seed * 100_000 + i for i in range(n)])
    phrases = e["phrases"] if phrases_from == "target" else captions
    direction = editor.identify(enc, [source.caption(lab) for lab in e["targets"]], mode, phrases, alphas=alphas)
    if image_only:
        direction.text_embeds = direction.text_pooled = None
    images = editor.manipulate(enc, direction, alphas)
    frame = pd.DataFrame(judge_edits(source.judge, images, e["sources"], e["targets"], attribute, alphas, e["rgb"],
                                     e["masks"]))
    frame.insert(0, "attribute", attribute)
    frame["direction_norm"] = np.repeat(direction.image_at(1.0).flatten(1).norm(dim=1).cpu().numpy(), len(alphas))
    return frame


def _summarise(rows, keys, n_boot):
    rng = np.random.default_rng(0)
    out = []
    for key, g in rows.groupby(keys + ["attribute", "alpha"], sort=False):
        row = {**dict(zip(keys + ["attribute", "alpha"], key)), **g.iloc[0][LEVEL_COLUMNS[1:]].to_dict(), "n": len(g)}
        for m in ("target_score", "success", "preserved", "background_psnr"):
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        row["direction_norm"] = float(g.direction_norm.mean())
        out.append(row)
    return pd.DataFrame(out)


def _table(summary, keys, alpha):
    s = summary[summary.alpha == alpha]
    z = summary[summary.alpha == 0.0].set_index(["model"] + keys[1:] + ["attribute"])
    lines = ["| " + " | ".join(keys) + f" | log-SNR | attribute | P(target) α=0 → {alpha:g} | success | others kept | "
             "background PSNR (dB) | ‖n_zt‖ |", "|" + "---|" * (len(keys) + 7)]
    for r in s.itertuples():
        base = z.loc[tuple(getattr(r, k) for k in ["model"] + keys[1:]) + (r.attribute,)]
        lines.append("| " + " | ".join(f"{getattr(r, k)}" for k in keys) + f" | {r.log_snr:.2f}"
                     f"{' *' if r.paper_start else ''} | {r.attribute} | "
                     f"{base.target_score:.2f} → {r.target_score:.2f} | {r.success:.0%} | {r.preserved:.0%} | "
                     f"{r.background_psnr:.1f} | {r.direction_norm:.1f} |")
    lines += ["", "log-SNR: where the edits start on that model's schedule (* = the paper's strength 0.75 starts there); "
              "the figure shows the paper's strength."]
    return "\n".join(lines) + "\n"


def _plot_hsds(summary, alpha):
    s = summary[summary.alpha == alpha]
    models, attrs = list(dict.fromkeys(s.model)), list(dict.fromkeys(s.attribute))
    fig, axes = plt.subplots(len(models), 2 * len(attrs), figsize=(3.3 * 2 * len(attrs), 2.9 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, attr in enumerate(attrs):
            g = s[(s.model == model) & (s.attribute == attr)]
            for k, (m, title) in enumerate((("target_score", "P(target)"), ("preserved", "others kept"))):
                grid = g.pivot(index="lam", columns="eta_start", values=m)
                ax = axes[i, 2 * j + k]
                sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", cbar=False, ax=ax,
                            annot_kws={"fontsize": 8})
                ax.invert_yaxis()  # lambda grows upwards
                ax.set(xlabel="step size η (start)", ylabel="λ", title=f"{model}: {attr} edits, {title} at α={alpha:g}")
                ax.title.set_fontsize(8)
    fig.colorbar(axes[0, 0].collections[0], ax=axes, shrink=0.6)
    return fig


def _plot_sds(summary, alpha):
    s = summary[summary.alpha == alpha]
    models = list(dict.fromkeys(s.model))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.4), squeeze=False)
    for i, model in enumerate(models):
        ax = axes[0, i]
        for guide, marker in (("target", "o"), ("source", "s")):
            g = s[(s.model == model) & (s.guide == guide)]
            ax.scatter(1 - g.preserved, g.target_score, marker=marker, s=40, label=f"guided by the {guide}")
            for r in g.itertuples():
                ax.annotate(r.attribute, (1 - r.preserved, r.target_score), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="unintended change (share of edits with another "
               "attribute changed)", ylabel=f"P(target) at α={alpha:g}", title=f"{model}: SDS image direction")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _with_keys(frame: pd.DataFrame, unit: Unit, level: dict) -> pd.DataFrame:
    """The unit's keys, then its level columns (``apply_level``), in front of its rows."""
    for i, (k, v) in enumerate([(k, v) for k, v in unit.keys if k != "level"] + list(level.items())):
        frame.insert(i, k, v)
    return frame


def _hsds_unit(ctx, unit: Unit, cfg: HSDSAblationConfig):
    editor, source = ctx
    level = apply_level(editor, unit["level"])
    editor.distill = DistillSettings(iterations=cfg.iterations, lam=unit["lam"], eta_start=unit["eta_start"],
                                     eta_end=unit["eta_start"] / 10)
    frame = pd.concat([_edit_rows(editor, source, a, cfg.n, cfg.seed, cfg.alphas, cfg.mode) for a in cfg.attributes],
                      ignore_index=True)
    return _with_keys(frame, unit, level), None


def _sds_unit(ctx, unit: Unit, cfg: SDSGuidanceConfig):
    editor, source = ctx
    level = apply_level(editor, unit["level"])
    frame = pd.concat([_edit_rows(editor, source, a, cfg.n, cfg.seed, cfg.alphas, "sds", unit["guide"], image_only=True)
                       for a in cfg.attributes], ignore_index=True)
    return _with_keys(frame, unit, level), None


def _reporter(name, keys, plot):
    def report(cfg, results, out) -> Report:
        rows = pd.concat([r.frame for r in results], ignore_index=True)
        summary = _summarise(rows, keys, cfg.bootstrap)
        table = _table(summary, keys, max(cfg.alphas))
        paper = summary[summary.paper_start.astype(bool)]
        figure = plot(paper if len(paper) else summary[summary.level == summary.level.iloc[0]], max(cfg.alphas))
        return Report(summary, files={"rows.csv": rows, "summary.csv": summary, "table.md": table},
                      figures={f"{name}.png": figure, f"{name}-table.md": table}, text=table)
    return report


def _line(frame: pd.DataFrame) -> str:
    top = frame[frame.alpha == frame.alpha.max()]
    return f"P(target) at the largest alpha {top.target_score.mean():.2f}, kept {top.preserved.mean():.0%}"


HSDS_STUDY = Study(
    name="hsds-ablation", help="HSDS lambda x step-size grid on edits (Fig. 11)", config=HSDSAblationConfig,
    units=lambda cfg: [Unit(m, (("lam", float(lam)), ("eta_start", float(eta)), ("level", lv))) for m in cfg.models
                       for lam in cfg.lams for eta in cfg.eta_starts for lv in cfg.levels()],
    prepare=lambda cfg, out: source_for(cfg, every_attribute=True),
    setup=lambda cfg, model, source: (cfg.editor(model), source), compute=_hsds_unit,
    report=_reporter("hsds-ablation", ["model", "level", "lam", "eta_start"], _plot_hsds),
    axes=("models", "lams", "eta_starts", *LEVEL_AXES), paper="Fig. 11: HSDS lambda and step size",
    toy_config="hsds-ablation-toy.yaml", paper_config="hsds-ablation-paper.yaml",
    revision=3,  # 2: the HSDS restraint pulls towards z_t under every sign (issue 15); 3: noise levels
    figure_files=("hsds-ablation.png", "hsds-ablation-table.md"), summary_line=_line,
)
SDS_STUDY = Study(
    name="sds-guidance", help="SDS image direction guided by the target phrase vs the source prompt (Fig. 12)",
    config=SDSGuidanceConfig,
    units=lambda cfg: [Unit(m, (("guide", g), ("level", lv))) for m in cfg.models for g in cfg.guides
                       for lv in cfg.levels()],
    prepare=lambda cfg, out: source_for(cfg, every_attribute=True),
    setup=lambda cfg, model, source: (cfg.editor(model), source), compute=_sds_unit,
    report=_reporter("sds-guidance", ["model", "level", "guide"], _plot_sds), axes=("models", "guides", *LEVEL_AXES),
    revision=2,  # 2: noise levels
    paper="Fig. 12: SDS guided by the target vs the source prompt", toy_config="sds-guidance-toy.yaml",
    paper_config="sds-guidance-paper.yaml", figure_files=("sds-guidance.png", "sds-guidance-table.md"),
    summary_line=_line,
)
run_hsds, hsds_config_from = HSDS_STUDY.run, HSDS_STUDY.config_from
run_sds, sds_config_from = SDS_STUDY.run, SDS_STUDY.config_from


# ----- which HSDS convention (issue 15): ascent/descent x CFG/conditional, compared at matched step -----
class HSDSConventionConfig(LevelSettings):
    """The image side alone (hsds-only) under each convention, over a grid of step sizes, so that the
    conventions are compared at matched effective step (the same ||n_zt||), not at one nominal eta: CFG
    inside eps multiplies the alignment term by about the guidance scale."""

    models: list[str] = ["toy-mmdit", "toy-unet"]
    attributes: list[str] = list(EDITABLE)
    signs: list[str] = ["descent", "ascent"]
    cfgs: list[bool] = [True, False]
    eta_starts: list[float] = [0.01, 0.03, 0.1, 0.3]  # decaying to a tenth over the iterations
    lam: float = 0.5
    iterations: int = 20
    caption: str = "omit"  # source caption for the image-only edit: omit the edited attribute, or full
    n: int = 50  # edits per attribute
    alphas: list[float] = [0.0, 1.0]
    seed: int = 20  # evaluation seeds: edits and noise no tuning has seen (toy-edits used 0, the ablations 2-3)

    def check(self):
        super().check()
        bad = [a for a in self.attributes if a not in EDITABLE]
        if bad:
            raise ValueError(f"attributes {bad} cannot be edited in the toy world; choose from {list(EDITABLE)}")
        if self.caption not in ("omit", "full"):
            raise ValueError(f"caption must be 'omit' or 'full', got {self.caption!r}")
        for sign in self.signs:
            DistillSettings(sign=sign).check()
        if min(self.eta_starts) <= 0 or self.n < 2 or 1.0 not in self.alphas or 0.0 not in self.alphas:
            raise ValueError("need eta_starts > 0, n >= 2, and alphas including 0 and 1")


def _convention_unit(ctx, unit: Unit, cfg: HSDSConventionConfig):
    editor, judge = ctx
    level = apply_level(editor, unit["level"])
    eta = unit["eta_start"]
    editor.distill = DistillSettings(iterations=cfg.iterations, lam=cfg.lam, eta_start=eta, eta_end=eta / 10,
                                     sign=unit["sign"], cfg=unit["cfg"])
    mode = "hsds-only/omit" if cfg.caption == "omit" else "hsds-only"
    b = edit_batch(editor, unit["attribute"], mode, cfg.n, cfg.seed, cfg.alphas)
    frame = pd.DataFrame(judge_edits(judge, b.images, [s.attributes for s, _ in b.pairs],
                                     [t.attributes for _, t in b.pairs], unit["attribute"], cfg.alphas, b.sources,
                                     b.masks))
    frame["cos_ref"] = np.repeat(b.cos_ref(), len(cfg.alphas))
    frame["direction_norm"] = np.repeat(b.direction.image_at(1.0).flatten(1).norm(dim=1).cpu().numpy(), len(cfg.alphas))
    frame["ref_norm"] = np.repeat(b.n_ref.flatten(1).norm(dim=1).cpu().numpy(), len(cfg.alphas))
    return _with_keys(frame, unit, level), None


def conventions_summary(rows: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Per model, convention, step and attribute at alpha 1: the target's gain in P(target) over alpha 0,
    success, preservation, cos(n_zt, n_ref) and ||n_zt|| with 95% bootstrap CIs over edits."""
    rng = np.random.default_rng(0)
    keys = ["model", "level", "sign", "cfg", "eta_start", "attribute"]
    at0 = rows[rows.alpha == 0.0].set_index(keys + ["edit"]).target_score
    out = []
    for key, g in rows[rows.alpha == 1.0].groupby(keys, sort=False):
        g = g.assign(gain=g.target_score.values - at0.loc[[(*key, e) for e in g.edit]].values)
        row = {**dict(zip(keys, key)), **g.iloc[0][LEVEL_COLUMNS[1:]].to_dict(), "n": len(g)}
        for m in ("gain", "target_score", "success", "preserved", "cos_ref", "direction_norm"):
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        row["ref_norm"] = float(g.ref_norm.mean())
        out.append(row)
    return pd.DataFrame(out)


def _conventions_table(summary: pd.DataFrame) -> str:
    lines = ["| model | log-SNR | convention | η start | attribute | ‖n_zt‖ (‖n_ref‖) | P(target) gain α 0 → 1 | success | "
             "others kept | cos(n_zt, n_ref) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        conv = f"{r.sign}, {'CFG' if r.cfg else 'cond'}"
        lines.append(f"| {r.model} | {r.log_snr:.2f}{' *' if r.paper_start else ''} | {conv} | {r.eta_start:g} | {r.attribute} | {r.direction_norm:.2f} ({r.ref_norm:.2f}) | "
                     f"{r.gain:+.2f} [{r.gain_lo:+.2f}, {r.gain_hi:+.2f}] | {r.success:.0%} | {r.preserved:.0%} | "
                     f"{r.cos_ref:+.2f} [{r.cos_ref_lo:+.2f}, {r.cos_ref_hi:+.2f}] |")
    return "\n".join(lines) + "\n"


def _plot_conventions(summary: pd.DataFrame):
    rows = list(dict.fromkeys(zip(summary.model, summary.level)))  # one pair of panel rows per model and level
    attrs = list(dict.fromkeys(summary.attribute))
    fig, axes = plt.subplots(2 * len(rows), len(attrs), figsize=(3.6 * len(attrs), 5.6 * len(rows)), squeeze=False)
    for i, (model, level) in enumerate(rows):
        for j, attr in enumerate(attrs):
            g = summary[(summary.model == model) & (summary.level == level) & (summary.attribute == attr)]
            for (sign, cfg), c in g.groupby(["sign", "cfg"], sort=False):
                c = c.sort_values("direction_norm")
                label = f"{sign}, {'CFG' if cfg else 'cond'}"
                axes[2 * i, j].errorbar(c.direction_norm, c.gain, [c.gain - c.gain_lo, c.gain_hi - c.gain], marker="o",
                                        ms=3, capsize=2, label=label)
                axes[2 * i + 1, j].plot(c.direction_norm, c.cos_ref, marker="o", ms=3, label=label)
            axes[2 * i, j].axhline(0, color="k", lw=0.5)
            axes[2 * i + 1, j].axhline(0, color="k", lw=0.5)
            axes[2 * i, j].set(xscale="log", title=f"{model} ({g.log_snr.iloc[0]:.2f} log-SNR): {attr}",
                               ylabel="P(target) gain at α=1")
            axes[2 * i + 1, j].set(xscale="log", xlabel="‖n_zt‖ (matched effective step)", ylabel="cos(n_zt, n_ref)")
            axes[2 * i, j].title.set_fontsize(9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _conventions_report(cfg, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    summary = conventions_summary(rows, cfg.bootstrap)
    table = _conventions_table(summary)
    return Report(summary, files={"rows.csv": rows, "summary.csv": summary, "table.md": table},
                  figures={"hsds-conventions.png": _plot_conventions(summary), "hsds-conventions-table.md": table},
                  text=table)


CONVENTIONS_STUDY = Study(
    name="hsds-conventions", help="HSDS ascent/descent x CFG/conditional at matched step size, judged on toy edits",
    config=HSDSConventionConfig,
    units=lambda cfg: [Unit(m, (("sign", s), ("cfg", c), ("eta_start", float(e)), ("attribute", a), ("level", lv)))
                       for m in cfg.models for s in cfg.signs for c in cfg.cfgs for e in cfg.eta_starts
                       for a in cfg.attributes for lv in cfg.levels()],
    setup=lambda cfg, model, shared: (EIMEditor(load_pipeline(model)), Judge()),
    compute=_convention_unit, report=_conventions_report,
    axes=("models", "signs", "cfgs", "eta_starts", "attributes", *LEVEL_AXES), revision=2,  # 2: noise levels
    paper="Eq. 1: the HSDS convention (sign, CFG) at matched step", toy_config="hsds-conventions-toy.yaml",
    figure_files=("hsds-conventions.png", "hsds-conventions-table.md"),
    summary_line=lambda f: (f"gain {f[f.alpha == 1].target_score.mean() - f[f.alpha == 0].target_score.mean():+.2f}"
                            f"  cos {f.cos_ref.mean():+.2f}  |n| {f.direction_norm.mean():.2f}"),
)
