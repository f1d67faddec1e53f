"""Toy-world editing study: does an edit move the target attribute, by degrees, and only it?

Source images are exact renders of random scenes; each edit changes one attribute (colour, size or
shape) to another value, with the source caption as t0, the edited caption as t1, and the target
attribute alone as the phrase z_s ("a blue shape", "a large shape", "a star"). For every model,
mode and attribute, all edits run as one batch over the alphas, and the judge reads every image:

- ``target_score``: the judge's probability of the target value (graded: should rise with alpha);
- ``success``: the judge reads the target value; ``preserved``: every other attribute reads as in the
  source; ``background_psnr``: PSNR (dB) over pixels that are background in both the source and the
  target render (exact masks: the toy world knows where the object is);
- bidirectional (eim): the alpha = +1 edit, encoded with the target caption and edited with alpha = -1
  along the same direction: does the source value come back?

Noise levels (``studies.levels``): nominal ``strengths`` and per-model matched ``log_snrs``; every row
carries the log-SNR it started at, so the models are compared at matched noise.

Results: ``edits.csv`` (one row per edit and alpha), ``summary.csv`` (means with 95% bootstrap CIs
over edits), ``table.md``, a curves figure at the paper's strength and success against log-SNR; one
unit per (model, mode, attribute, level), run and cached by ``studies.runner``.

    dit-probe run toy-edits
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..editing import DistillSettings, EditDirection, EIMEditor
from ..registry import load_pipeline
from ..stats import mean_ci
from ..toyworld import Judge
from .levels import LEVEL_AXES, LEVEL_COLUMNS, LevelSettings, apply_level, plot_against_log_snr, with_level
from .runner import Report, Study, Unit
from .sources import EDITABLE, check_modes, distill_settings, edit_batch, judge_edits


class ToyEditConfig(LevelSettings):
    attributes: list[str] = list(EDITABLE)
    modes: list[str] = ["eim", "prompt-only", "hsds-only", "dds"]
    n: int = 30  # edits per attribute
    alphas: list[float] = [0.0, 0.5, 1.0, 1.5]
    seed: int = 0  # scenes, targets and noise
    bidirectional: bool = True  # eim only: +1 then -1
    distill: dict = {}  # image-side settings (DistillSettings fields, e.g. {lam: 1.0}); unset ones keep the defaults
    batch_size: int | None = None

    def check(self):
        super().check()
        bad = [a for a in self.attributes if a not in EDITABLE]
        if bad:
            raise ValueError(f"attributes {bad} cannot be edited in the toy world; choose from {list(EDITABLE)}")
        check_modes(self.modes, references=True, omit=True)
        if self.n < 2:
            raise ValueError(f"n must be >= 2 edits per attribute, got {self.n}")
        if 1.0 not in [float(a) for a in self.alphas]:
            raise ValueError("alphas must include 1.0 (success is read at alpha = 1)")
        self.distill_settings()

    def distill_settings(self) -> DistillSettings:
        return distill_settings(self.distill)


def run_unit(editor, judge, attribute: str, mode: str, cfg: ToyEditConfig) -> pd.DataFrame:
    """All edits of one attribute in one mode with one model."""
    b = edit_batch(editor, attribute, mode, cfg.n, cfg.seed, cfg.alphas)
    pairs, seeds, images = b.pairs, b.seeds, b.images
    rows = judge_edits(judge, images, [s.attributes for s, _ in pairs], [t.attributes for _, t in pairs], attribute,
                       cfg.alphas, b.sources, b.masks)
    frame = pd.DataFrame(rows)
    frame["cos_ref"] = np.repeat(b.cos_ref(), len(cfg.alphas))
    if cfg.bidirectional:
        for name, back in returns(editor, b, alphas=cfg.alphas).items():
            reads = judge.read(back)
            frame[name] = np.repeat([r[attribute] == getattr(s, attribute) for r, (s, _) in zip(reads, pairs)],
                                    len(cfg.alphas))
    frame.insert(0, "attribute", attribute)
    frame.insert(0, "mode", mode)
    return frame


def returns(editor, b, alphas) -> dict[str, np.ndarray]:
    """Bidirectional edits: the alpha = 1 result re-encoded under the target caption (same noise), then
    - ``returned_swap``: alpha = -1 along the same direction. Its text side lands exactly on the source
      caption, so this is a prompt swap back (plus -n_zt on the image side);
    - ``returned_image``: -n_zt alone, the caption kept at the target: does the image direction by
      itself walk the edit back? (modes with an image side only)."""
    k = [float(a) for a in alphas].index(1.0)
    targets = [t.caption() for _, t in b.pairs]
    back_enc = editor.encode(b.images[:, k], targets, b.seeds)
    out = {"returned_swap": editor.manipulate(back_enc, b.direction, [-1.0])[:, 0]}
    if b.direction.image is not None:
        out["returned_image"] = editor.manipulate(back_enc, EditDirection(image=b.direction.image_at(1.0)), [-1.0])[:, 0]
    return out


def summarise(edits: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Means with 95% bootstrap CIs over edits, per model, mode, attribute and alpha."""
    rng = np.random.default_rng(0)
    rows = []
    measures = ["target_score", "success", "preserved", "background_psnr", "background_ssim", "cos_ref",
                "returned_swap", "returned_image"]
    keys = ["model", "level", "mode", "attribute", "alpha"]
    for key, g in edits.groupby(keys, sort=False):
        row = {**dict(zip(keys, key)), **g.iloc[0][LEVEL_COLUMNS[1:]].to_dict(), "n": len(g)}
        for m in measures:
            if m not in g or g[m].isna().all():
                continue
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        rows.append(row)
    return pd.DataFrame(rows)


def _change(at0, at1, key, fmt) -> str:
    """'value at alpha 0 -> value at alpha 1' (only the latter when alpha 0 was not run)."""
    return (fmt.format(at0[key]) + " → " if at0 is not None else "") + fmt.format(at1[key])


def paired_gains(edits: pd.DataFrame, baseline: str = "prompt-only", n_boot: int = 1000) -> pd.DataFrame:
    """Success at alpha 1 of every mode minus ``baseline``'s, paired over the same edits (same sources,
    targets and noise), per model, level and attribute, with a 95% bootstrap CI over edits."""
    rng = np.random.default_rng(0)
    at1 = edits[edits.alpha == 1.0]
    out = []
    for (model, level, attr), g in at1.groupby(["model", "level", "attribute"], sort=False):
        base = g[g["mode"] == baseline].set_index("edit").success.astype(float)
        for mode, m in g[g["mode"] != baseline].groupby("mode", sort=False):
            d = (m.set_index("edit").success.astype(float) - base).dropna().values
            boot = rng.choice(d, (n_boot, len(d))).mean(1)
            out.append({"model": model, "level": level, "log_snr": g.log_snr.iloc[0], "attribute": attr, "mode": mode,
                        "baseline": baseline, "baseline_success": base.mean(), "gain": d.mean(),
                        "gain_lo": np.percentile(boot, 2.5), "gain_hi": np.percentile(boot, 97.5), "n": len(d)})
    return pd.DataFrame(out)


def gains_table(gains: pd.DataFrame) -> str:
    """Markdown: each mode's paired gain in success over the baseline, one row per (attribute, level, model)."""
    if gains.empty:
        return ""
    modes = list(dict.fromkeys(gains["mode"]))
    base = gains.baseline.iloc[0]
    lines = [f"Success at α = 1 minus {base}'s, paired over the same edits (points, 95% bootstrap CI):", "",
             f"| attribute | log-SNR | model | {base} | " + " | ".join(modes) + " |", "|---|---|---|---|" + "---|" * len(modes)]
    for (attr, level, model), g in gains.sort_values(["attribute", "log_snr", "model"]).groupby(
            ["attribute", "level", "model"], sort=False):
        g = g.set_index("mode")
        cells = [f"{100 * g.gain[m]:+.0f} [{100 * g.gain_lo[m]:+.0f}, {100 * g.gain_hi[m]:+.0f}]" if m in g.index else "–"
                 for m in modes]
        lines.append(f"| {attr} | {g.log_snr.iloc[0]:.2f} | {model} | {g.baseline_success.iloc[0]:.0%} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: pd.DataFrame) -> str:
    """Success and preservation at alpha = 1, the score slope, the image side against the truth, and
    bidirectional return, per model and mode."""
    lines = ["| attribute | mode | log-SNR | model | target score α=0 → 1 | success α=1 | others preserved α=0 → 1 | "
             "background PSNR α=0 → 1 (dB) | cos(n_zt, n_ref) | returned: swap / image side |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(r, m):
        return f"{r[m]:.0%}" if m in r and pd.notna(r[m]) else "–"

    order = summary.assign(_m=summary["mode"].map({m: i for i, m in enumerate(dict.fromkeys(summary["mode"]))}))
    for (attr, _, level, model), g in order.sort_values(["attribute", "_m", "log_snr", "model"]).groupby(
            ["attribute", "_m", "level", "model"], sort=False):
        a0, a1 = g[g.alpha == 0.0], g[g.alpha == 1.0]
        if a1.empty:
            continue
        r = a1.iloc[0]
        z = a0.iloc[0] if not a0.empty else None
        cos = f"{r.cos_ref:.2f}" if "cos_ref" in r and pd.notna(r.cos_ref) else "–"
        star = " *" if r.paper_start else ""
        lines.append(f"| {attr} | {r['mode']} | {r.log_snr:.2f}{star} | {model} | {_change(z, r, 'target_score', '{:.2f}')} | "
                     f"{r.success:.0%} [{r.success_lo:.0%}, {r.success_hi:.0%}] | {_change(z, r, 'preserved', '{:.0%}')} | "
                     f"{_change(z, r, 'background_psnr', '{:.1f}')} | {cos} | "
                     f"{pct(r, 'returned_swap')} / {pct(r, 'returned_image')} |")
    lines += ["", "log-SNR: where the edit starts on that model's schedule (* = the paper's strength 0.75 starts there); "
              "95% bootstrap CIs over edits."]
    return "\n".join(lines) + "\n"


def plot_curves(summary: pd.DataFrame):
    models = list(dict.fromkeys(summary.model))
    attrs = list(dict.fromkeys(summary.attribute))
    fig, axes = plt.subplots(len(attrs), len(models), figsize=(4.6 * len(models), 3.0 * len(attrs)), squeeze=False)
    for j, model in enumerate(models):
        for i, attr in enumerate(attrs):
            ax = axes[i, j]
            for mode, g in summary[(summary.model == model) & (summary.attribute == attr)].groupby("mode", sort=False):
                ax.plot(g.alpha, g.target_score, marker="o", ms=3, label=mode)
                ax.fill_between(g.alpha, g.target_score_lo, g.target_score_hi, alpha=0.15)
            ax.set_ylim(0, 1)
            ax.set_title(f"{model}: {attr} edits", fontsize=9)
            ax.set_xlabel("alpha")
            if j == 0:
                ax.set_ylabel("judge P(target value)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _setup(cfg: ToyEditConfig, model: str, shared) -> SimpleNamespace:
    return SimpleNamespace(editor=EIMEditor(load_pipeline(model), distill=cfg.distill_settings(),
                                            batch_size=cfg.batch_size), judge=Judge())


def _compute(ctx, unit: Unit, cfg: ToyEditConfig):
    level = apply_level(ctx.editor, unit["level"])
    return with_level(run_unit(ctx.editor, ctx.judge, unit["attribute"], unit["mode"], cfg), level), None


def _report(cfg: ToyEditConfig, results, out) -> Report:
    edits = pd.concat([r.frame for r in results], ignore_index=True)
    summary = summarise(edits, cfg.bootstrap)
    gains = paired_gains(edits, n_boot=cfg.bootstrap) if "prompt-only" in cfg.modes else pd.DataFrame()
    table = markdown_table(summary) + ("\n" + gains_table(gains) if len(gains) else "")
    return Report(summary, files={"edits.csv": edits, "summary.csv": summary, "gains.csv": gains, "table.md": table},
                  figures={"editing-toy-curves.png": plot_curves(summary[summary.paper_start.astype(bool)]),
                           "editing-toy-levels.png": plot_against_log_snr(
                               summary[summary.alpha == 1.0], "success", "attribute", "mode", "success at α = 1"),
                           "editing-toy-table.md": table,
                           "editing-toy-summary.csv": summary}, text=table)


def _line(frame: pd.DataFrame) -> str:
    a1 = frame[frame.alpha == 1.0]
    return (f"success@1 {a1.success.mean():.0%}  preserved {a1.preserved.mean():.0%}  "
            f"score {frame[frame.alpha == 0].target_score.mean():.2f} -> {a1.target_score.mean():.2f}")


STUDY = Study(
    name="toy-edits", help="EIM and its ablations on toy edits, measured by the judge", config=ToyEditConfig,
    units=lambda cfg: [Unit(m, (("mode", mode), ("attribute", a), ("level", lv))) for m in cfg.models
                       for mode in cfg.modes for a in cfg.attributes for lv in cfg.levels()],
    setup=_setup, compute=_compute, report=_report, axes=("models", "modes", "attributes", *LEVEL_AXES),
    paper="sections 3.1, 5.2: EIM and ablations, bidirectional edits", toy_config="toy-edits.yaml",
    revision=3,  # 2: the HSDS restraint pulls towards z_t under every sign (issue 15); 3: noise levels
    figure_files=("editing-toy-curves.png", "editing-toy-levels.png", "editing-toy-table.md", "editing-toy-summary.csv"),
    summary_line=_line,
)
run, config_from = STUDY.run, STUDY.config_from
