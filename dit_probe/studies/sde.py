"""Table 3: the SDE metric (paper Eq. 2, ``dit_probe.metrics.sde``) per model and binary attribute.

Toy (default): for each attribute, renders whose value is one of a binary pair (colour red/blue, shape
circle/square, size small/large, background black/white), c = the full caption, c~ = the caption
with that attribute flipped. Real: CelebA images (``source: celeba``, ``celeba: FOLDER``) with the
six Table 3 attributes, captions from per-attribute phrases. Each image is noised once per seed and
denoised under c and under c~ from that same noised latent; the judge also reads whether the flip
took (``flip_success``) and whether c kept the value (``kept_success``), so a low SDE can be checked
against what actually happened.

Results: ``sde.csv`` (per image and seed), ``summary.csv`` (means with 95% bootstrap CIs over images),
``table.md`` (Table 3 layout) and a bar figure; one unit per (model, attribute), run and cached by
``studies.runner``.

    dit-probe run sde
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..adapters.base import check_strength
from ..editing import EIMEditor
from ..metrics.sde import NORMS, sde
from ..registry import load_pipeline
from ..stats import mean_ci
from .runner import PAPER_STRENGTH, Report, Study, StudyConfig, Unit
from .sources import source_for


class SDEConfig(StudyConfig):
    source: str = "toy"  # toy | celeba
    celeba: str | None = None
    clip: str | None = None
    attributes: list[str] = ["color", "shape", "size", "background"]
    n: int = 40  # images per attribute
    seeds: int = 2  # noise samples per image
    strength: float = PAPER_STRENGTH  # the forward timestep t, as a fraction of the schedule
    norm: str = "rms"  # rms (pixels in [0, 1], resolution-independent) or l2 (the paper's literal norm)
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int | None = None

    def check(self):
        try:
            check_strength(self.strength)
        except ValueError:
            raise ValueError(f"strength {self.strength!r} is outside (0, 1]: it is the forward timestep t as a "
                             "fraction of the schedule (the paper edits at 0.75)") from None
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose from {NORMS}")
        if self.n < 2 or self.seeds < 1:
            raise ValueError(f"need n >= 2 images and seeds >= 1, got n={self.n}, seeds={self.seeds}")


def _setup(cfg: SDEConfig, model: str, source) -> SimpleNamespace:
    return SimpleNamespace(source=source, editor=EIMEditor(
        load_pipeline(model), strength=cfg.strength, num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size))


def run_unit(editor, source, attribute: str, cfg: SDEConfig) -> pd.DataFrame:
    items = source.sample(cfg.n, cfg.seed * 7 + list(source.values).index(attribute), binary=attribute, size=editor.size)
    images = np.repeat(items.images, cfg.seeds, axis=0)
    labels = [lab for lab in items.labels for _ in range(cfg.seeds)]
    flipped_labels = [{**lab, attribute: source.flip(attribute, lab[attribute])} for lab in labels]
    seeds = [cfg.seed * 1_000_003 + i * 101 + j for i in range(len(items)) for j in range(cfg.seeds)]
    res = sde(editor, images, [source.caption(lab) for lab in labels],
              [source.caption(lab) for lab in flipped_labels], seeds, cfg.norm)
    judge = source.judge
    kept_reads, flip_reads = judge.read(res["x_hat"]), judge.read(res["x_tilde"])
    return pd.DataFrame({
        "attribute": attribute, "image": np.arange(len(labels)) // cfg.seeds, "noise": np.arange(len(labels)) % cfg.seeds,
        "value": [lab[attribute] for lab in labels], "flipped_value": [lab[attribute] for lab in flipped_labels],
        "kept": res["kept"], "flipped": res["flipped"], "ratio": res["ratio"], "sde": res["sde"],
        "kept_success": [r[attribute] == lab[attribute] for r, lab in zip(kept_reads, labels)],
        "flip_success": [r[attribute] == lab[attribute] for r, lab in zip(flip_reads, flipped_labels)],
        "strength": editor.strength, "timestep": res["timestep"], "norm": cfg.norm,
    })


def summarise(rows: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    out = []
    for (model, attr), g in rows.groupby(["model", "attribute"], sort=False):
        per_image = g.groupby("image")[["sde", "ratio", "kept", "flipped", "flip_success", "kept_success"]].mean()
        row = {"model": model, "attribute": attr, "images": len(per_image), "samples": len(g)}
        for m in per_image.columns:
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(per_image[m].astype(float).values, n_boot, rng)
        out.append(row)
    return pd.DataFrame(out)


def markdown_table(summary: pd.DataFrame, norm: str) -> str:
    attrs = list(dict.fromkeys(summary.attribute))
    lines = ["| model | " + " | ".join(f"SDE on {a} ↓" for a in attrs) + " | mean |",
             "|---|" + "---|" * (len(attrs) + 1)]
    for model, g in summary.groupby("model", sort=False):
        g = g.set_index("attribute")
        cells = [f"{g.loc[a, 'sde']:.3f} [{g.loc[a, 'sde_lo']:.3f}, {g.loc[a, 'sde_hi']:.3f}]" for a in attrs]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {g.loc[attrs, 'sde'].mean():.3f} |")
    lines += ["", "What happened (judge): the flipped prompt gives the flipped value / the original prompt keeps it; "
              "ratio = ||x - x̂|| / ||x - x̃||, flipped = ||x - x̃||:", "",
              "| model | attribute | flip took | value kept | ratio | flipped |", "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.model} | {r.attribute} | {r.flip_success:.0%} | {r.kept_success:.0%} | {r.ratio:.3f} | "
                     f"{r.flipped:.3f} |")
    lines += ["", f"Norm: {norm} ({'root-mean-square over pixels in [0, 1]' if norm == 'rms' else 'Euclidean over pixels in [0, 1]'}); "
              "95% bootstrap CIs over images; lower is better."]
    return "\n".join(lines) + "\n"


def plot_bars(summary: pd.DataFrame):
    models = list(dict.fromkeys(summary.model))
    attrs = list(dict.fromkeys(summary.attribute))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(models)
    x = np.arange(len(attrs))
    for k, model in enumerate(models):
        g = summary[summary.model == model].set_index("attribute").loc[attrs]
        err = np.stack([g.sde - g.sde_lo, g.sde_hi - g.sde])
        axes[0].bar(x + k * width, g.sde, width, yerr=err, capsize=3, label=model)
        axes[1].bar(x + k * width, g.flip_success, width, label=model)
    for ax, title in zip(axes, ["SDE (Eq. 2), lower = more disentangled; 95% CI", "judge: the flipped prompt took"]):
        ax.set_xticks(x + width * (len(models) - 1) / 2, attrs)
        ax.set_title(title, fontsize=9)
    axes[1].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _report(cfg: SDEConfig, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    summary = summarise(rows, cfg.bootstrap)
    table = markdown_table(summary, cfg.norm)
    return Report(summary, files={"sde.csv": rows, "summary.csv": summary, "table.md": table},
                  figures={"sde-table3.png": plot_bars(summary), "sde-table3.md": table}, text=table)


STUDY = Study(
    name="sde", help="the SDE disentanglement metric per model and binary attribute (Table 3)", config=SDEConfig,
    units=lambda cfg: [Unit(m, (("attribute", a),)) for m in cfg.models for a in cfg.attributes],
    prepare=lambda cfg, out: source_for(cfg), setup=_setup,
    compute=lambda ctx, unit, cfg: (run_unit(ctx.editor, ctx.source, unit["attribute"], cfg), None),
    report=_report, axes=("models", "attributes"),
    paper="Table 3: the SDE metric per model and attribute", toy_config="sde-toy.yaml", paper_config="sde-paper.yaml",
    figure_files=("sde-table3.png", "sde-table3.md"),
    summary_line=lambda f: f"SDE {f.sde.mean():.3f}  flip took {f.flip_success.mean():.0%}",
)
run, config_from = STUDY.run, STUDY.config_from
