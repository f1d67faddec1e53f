"""Table 3: the SDE metric (paper Eq. 2, ``dit_probe.metrics.sde``) per model, binary attribute and noise level.

Toy (default): for each attribute, renders whose value is one of a binary pair (colour red/blue, shape
circle/square, size small/large, background black/white), c = the full caption, c~ = the caption
with that attribute flipped. Real: CelebA images (``source: celeba``, ``celeba: FOLDER``) with the
six Table 3 attributes, captions from per-attribute phrases. Each image is noised once per seed and
denoised from that same noised latent three times: under c, under c~, and under c without the
attribute (the semantic-loss measurement at the same noise level).

Read honestly:

- **Noise levels** (``studies.levels``): nominal ``strengths`` and ``log_snrs`` matched per model; only
  matched log-SNR compares models.
- **The precondition.** Eq. 2 presumes the attribute is lost at t when the prompt omits it. Each cell
  states whether it holds: the omitting caption keeps the value (``omit_kept``, 95% CI) at most
  ``lost_margin`` of the way from chance to always (upper CI bound). A verdict is given only where it
  holds for both models, at matched log-SNR, from a bootstrap CI of the difference.
- **Scale.** SDE = kept/flipped + flipped >= 2 sqrt(kept) (equality at flipped = sqrt(kept)): the
  ``floor`` column, and ``floor_share`` = floor / SDE. Where the floor is most of SDE the number mostly
  measures the reconstruction error. The scale-free reading, which the docs lead with, is ``ratio`` =
  kept / flipped (unchanged when every distance is scaled): below 1 the flipped prompt moves the image
  more than reconstruction error does. The judge's ``flip_success`` and ``kept_success`` say whether the
  flip took and c kept the value.

Results: ``sde.csv`` (per image and seed), ``summary.csv`` (means with 95% bootstrap CIs over images),
``verdicts.csv``, ``table.md`` and a figure against log-SNR; one unit per (model, attribute, level),
run and cached by ``studies.runner``.

    dit-probe run sde --log-snr -3 --log-snr -1.5
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..editing import EIMEditor
from ..metrics.sde import NORMS, sde
from ..registry import load_pipeline
from ..stats import mean_ci
from .levels import LEVEL_AXES, LevelSettings, apply_level
from .runner import Report, Study, Unit
from .sources import source_for

METRICS = ["sde", "ratio", "kept", "flipped", "floor", "floor_share", "flip_success", "kept_success", "omit_kept"]


class SDEConfig(LevelSettings):
    source: str = "toy"  # toy | celeba
    celeba: str | None = None
    clip: str | None = None
    attributes: list[str] = ["color", "shape", "size", "background"]
    n: int = 40  # images per attribute
    seeds: int = 2  # noise samples per image
    norm: str = "rms"  # rms (pixels in [0, 1], resolution-independent) or l2 (the paper's literal norm)
    lost_margin: float = 0.5  # precondition: omit_kept's upper CI at most this far from chance towards 1
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int | None = None

    REPORT_ONLY = ("bootstrap", "lost_margin")

    def check(self):
        super().check()
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose from {NORMS}")
        if self.n < 2 or self.seeds < 1:
            raise ValueError(f"need n >= 2 images and seeds >= 1, got n={self.n}, seeds={self.seeds}")
        if not 0.0 <= self.lost_margin < 1.0:
            raise ValueError(f"lost_margin must be in [0, 1), got {self.lost_margin}")


def _setup(cfg: SDEConfig, model: str, source) -> SimpleNamespace:
    return SimpleNamespace(source=source, editor=EIMEditor(
        load_pipeline(model), num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size))


def run_unit(editor, source, attribute: str, cfg: SDEConfig, level: dict | None = None) -> pd.DataFrame:
    """SDE terms, the judge's reading of both branches, and whether the omitting caption keeps the value,
    for every image and noise seed at the editor's strength."""
    items = source.sample(cfg.n, cfg.seed * 7 + list(source.values).index(attribute), binary=attribute, size=editor.size)
    images = np.repeat(items.images, cfg.seeds, axis=0)
    labels = [lab for lab in items.labels for _ in range(cfg.seeds)]
    flipped_labels = [{**lab, attribute: source.flip(attribute, lab[attribute])} for lab in labels]
    seeds = [cfg.seed * 1_000_003 + i * 101 + j for i in range(len(items)) for j in range(cfg.seeds)]
    captions = [source.caption(lab) for lab in labels]
    # the precondition from the same noised latents: does the caption without the attribute keep it?
    res = sde(editor, images, captions, [source.caption(lab) for lab in flipped_labels], seeds, cfg.norm,
              omitted_prompts=[source.caption(lab, drop=(attribute,)) for lab in labels])
    judge = source.judge
    kept_reads, flip_reads, omit_reads = (judge.read(res[k]) for k in ("x_hat", "x_tilde", "x_omit"))
    frame = pd.DataFrame({
        "attribute": attribute, "image": np.arange(len(labels)) // cfg.seeds, "noise": np.arange(len(labels)) % cfg.seeds,
        "value": [lab[attribute] for lab in labels], "flipped_value": [lab[attribute] for lab in flipped_labels],
        "kept": res["kept"], "flipped": res["flipped"], "ratio": res["ratio"], "sde": res["sde"],
        "floor": 2 * np.sqrt(res["kept"]), "floor_share": 2 * np.sqrt(res["kept"]) / res["sde"],
        "kept_success": [r[attribute] == lab[attribute] for r, lab in zip(kept_reads, labels)],
        "flip_success": [r[attribute] == lab[attribute] for r, lab in zip(flip_reads, flipped_labels)],
        "omit_kept": [r[attribute] == lab[attribute] for r, lab in zip(omit_reads, labels)],
        "chance": 1.0 / len(source.values[attribute]), "timestep": res["timestep"], "norm": cfg.norm,
    })
    for k, v in (level or {"strength": editor.strength}).items():
        frame[k] = v
    return frame


def summarise(rows: pd.DataFrame, n_boot: int = 1000, lost_margin: float = 0.5) -> pd.DataFrame:
    """Per (model, attribute, level): means over images (seeds averaged first) with 95% bootstrap CIs, and
    whether the precondition holds (omit_kept's upper bound at most ``lost_margin`` from chance to 1)."""
    rng = np.random.default_rng(0)
    out = []
    for (model, attr, level), g in rows.groupby(["model", "attribute", "level"], sort=False):
        per_image = g.groupby("image")[METRICS].mean()
        first = g.iloc[0]
        row = {"model": model, "attribute": attr, "level": level, "target_log_snr": first.target_log_snr,
               "strength": first.strength, "log_snr": first.log_snr, "paper_start": bool(first.paper_start),
               "images": len(per_image), "samples": len(g), "chance": first.chance}
        for m in METRICS:
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(per_image[m].astype(float).values, n_boot, rng)
        row["lost_below"] = first.chance + lost_margin * (1 - first.chance)
        row["precondition"] = bool(row["omit_kept_hi"] <= row["lost_below"])
        out.append(row)
    return pd.DataFrame(out)


def _diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int, rng) -> tuple[float, float, float]:
    """mean(b) - mean(a) with a 95% bootstrap CI, images resampled independently per model."""
    boot = [rng.choice(b, len(b)).mean() - rng.choice(a, len(a)).mean() for _ in range(n_boot)]
    return float(b.mean() - a.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def verdicts(rows: pd.DataFrame, summary: pd.DataFrame, n_boot: int = 1000, models=None) -> pd.DataFrame:
    """Which model has the lower ratio kept/flipped (and SDE), per attribute and matched log-SNR target:
    a verdict only where the precondition holds for both models and the CI of the difference excludes 0."""
    rng = np.random.default_rng(1)
    models = list(models or dict.fromkeys(summary.model))
    out = []
    matched = summary[summary.level.str.startswith("log_snr=")]
    for (attr, level), g in matched.groupby(["attribute", "level"], sort=False):
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                if not {a, b} <= set(g.model):
                    continue
                sa, sb = g[g.model == a].iloc[0], g[g.model == b].iloc[0]
                row = {"attribute": attr, "level": level, "model_a": a, "model_b": b,
                       "log_snr_a": sa.log_snr, "log_snr_b": sb.log_snr,
                       "precondition": bool(sa.precondition and sb.precondition)}
                for m in ("ratio", "sde"):
                    pa, pb = ([rows[(rows.model == x) & (rows.attribute == attr) & (rows.level == level)]
                               .groupby("image")[m].mean().values for x in (a, b)])
                    row[f"{m}_diff"], row[f"{m}_diff_lo"], row[f"{m}_diff_hi"] = _diff_ci(pa, pb, n_boot, rng)
                if not row["precondition"]:
                    row["verdict"] = "no verdict: precondition fails"
                elif row["ratio_diff_lo"] > 0:
                    row["verdict"] = f"{a} lower ratio"
                elif row["ratio_diff_hi"] < 0:
                    row["verdict"] = f"{b} lower ratio"
                else:
                    row["verdict"] = "no difference (CI spans 0)"
                out.append(row)
    return pd.DataFrame(out)


def _ci(r, m, fmt="{:.2f}"):
    return f"{fmt.format(r[m])} [{fmt.format(r[m + '_lo'])}, {fmt.format(r[m + '_hi'])}]"


def markdown_table(summary: pd.DataFrame, verdict: pd.DataFrame, norm: str) -> str:
    lines = []
    if len(verdict):
        lines += ["Matched log-SNR: which model's flipped prompt moves the image more, relative to its reconstruction "
                  "error (ratio = kept / flipped, lower is more disentangled; difference = second model minus first, "
                  "95% bootstrap CI over images). A verdict needs the precondition in both models.", "",
                  "| attribute | target log-SNR | models | log-SNR reached | precondition | ratio difference | "
                  "SDE difference | verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in verdict.itertuples():
            lines.append(f"| {r.attribute} | {r.level.split('=')[1]} | {r.model_a} / {r.model_b} | {r.log_snr_a:.2f} / "
                         f"{r.log_snr_b:.2f} | {'holds' if r.precondition else 'fails'} | {r.ratio_diff:+.3f} "
                         f"[{r.ratio_diff_lo:+.3f}, {r.ratio_diff_hi:+.3f}] | {r.sde_diff:+.3f} [{r.sde_diff_lo:+.3f}, "
                         f"{r.sde_diff_hi:+.3f}] | {r.verdict} |")
        lines.append("")
    lines += ["Every cell (means with 95% bootstrap CIs over images). omitted kept: the caption without the attribute "
              "keeps its value (the precondition holds when its upper bound is at most 'lost below'); floor = 2 sqrt(kept), "
              "the least SDE any flip can score; * = the paper's strength 0.75 starts here.", "",
              "| model | attribute | level | log-SNR | omitted kept | lost below | precondition | ratio ↓ | SDE ↓ | "
              "floor | floor / SDE | flip took | value kept |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.sort_values(["attribute", "log_snr", "model"]).iterrows():
        lines.append(f"| {r.model} | {r.attribute} | {r.level}{' *' if r.paper_start else ''} | {r.log_snr:.2f} | "
                     f"{_ci(r, 'omit_kept', '{:.0%}')} | {r.lost_below:.0%} | {'holds' if r.precondition else 'FAILS'} | "
                     f"{_ci(r, 'ratio')} | {_ci(r, 'sde')} | {r.floor:.2f} | {r.floor_share:.0%} | "
                     f"{r.flip_success:.0%} | {r.kept_success:.0%} |")
    lines += ["", f"Norm: {norm} ({'root-mean-square over pixels in [0, 1]' if norm == 'rms' else 'Euclidean over pixels in [0, 1]'})."]
    return "\n".join(lines) + "\n"


def plot_levels(summary: pd.DataFrame):
    """Ratio and flip success against log-SNR, one column per attribute, both models on one axis; hollow
    markers where the precondition fails, a star at the paper's strength."""
    attrs = list(dict.fromkeys(summary.attribute))
    fig, axes = plt.subplots(2, len(attrs), figsize=(3.2 * len(attrs), 5.6), squeeze=False, sharex=True)
    for j, attr in enumerate(attrs):
        for k, (model, g) in enumerate(summary[summary.attribute == attr].groupby("model", sort=False)):
            g = g.sort_values("log_snr")
            color = f"C{k}"
            for i, (m, lo, hi) in enumerate((("ratio", "ratio_lo", "ratio_hi"),
                                             ("flip_success", "flip_success_lo", "flip_success_hi"))):
                ax = axes[i, j]
                ax.plot(g.log_snr, g[m], color=color, lw=1, label=model if i == 0 and j == 0 else None)
                ax.fill_between(g.log_snr, g[lo], g[hi], color=color, alpha=0.12)
                ok = g.precondition.values
                ax.scatter(g.log_snr[ok], g[m][ok], color=color, s=22, zorder=3)
                ax.scatter(g.log_snr[~ok], g[m][~ok], facecolors="none", edgecolors=color, s=22, zorder=3)
                paper = g.paper_start.values.astype(bool)
                ax.scatter(g.log_snr[paper], g[m][paper], marker="*", color=color, s=90, zorder=4)
        axes[0, j].set_title(f"{attr}", fontsize=9)
        axes[1, j].set_xlabel("log-SNR at the start (noisier to the left)")
        axes[1, j].set_ylim(0, 1.05)
    axes[0, 0].set_ylabel("ratio kept / flipped\n(lower: more disentangled)")
    axes[1, 0].set_ylabel("judge: the flip took")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("SDE, scale-free. Filled: precondition holds (attribute lost when omitted); hollow: it fails;\n"
                 "star: the paper's strength 0.75; bands: 95% CIs", fontsize=9)
    fig.tight_layout()
    return fig


def _report(cfg: SDEConfig, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    summary = summarise(rows, cfg.bootstrap, cfg.lost_margin)
    verdict = verdicts(rows, summary, cfg.bootstrap, cfg.models)
    table = markdown_table(summary, verdict, cfg.norm)
    return Report(summary, files={"sde.csv": rows, "summary.csv": summary, "verdicts.csv": verdict, "table.md": table},
                  figures={"sde-table3.png": plot_levels(summary), "sde-table3.md": table}, text=table)


def _compute(ctx, unit: Unit, cfg: SDEConfig):
    level = apply_level(ctx.editor, unit["level"])
    return run_unit(ctx.editor, ctx.source, unit["attribute"], cfg, level), None


STUDY = Study(
    name="sde", help="the SDE disentanglement metric per model, binary attribute and noise level (Table 3)",
    config=SDEConfig,
    units=lambda cfg: [Unit(m, (("attribute", a), ("level", lv))) for m in cfg.models for a in cfg.attributes
                       for lv in cfg.levels()],
    prepare=lambda cfg, out: source_for(cfg), setup=_setup, compute=_compute,
    report=_report, axes=("models", "attributes", *LEVEL_AXES),
    paper="Table 3: the SDE metric per model and attribute", toy_config="sde-toy.yaml", paper_config="sde-paper.yaml",
    figure_files=("sde-table3.png", "sde-table3.md"),
    revision=2,  # 2: noise levels, the omitting caption (precondition), the floor
    summary_line=lambda f: (f"log-SNR {f.log_snr.iloc[0]:.2f}  ratio {f.ratio.mean():.2f}  flip took "
                            f"{f.flip_success.mean():.0%}  omitted kept {f.omit_kept.mean():.0%}"),
)
run, config_from = STUDY.run, STUDY.config_from
