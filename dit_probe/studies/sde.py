"""Table 3: the SDE metric (paper Eq. 2, ``dit_probe.metrics.sde``) per model and binary attribute.

Toy (default): for each attribute, renders whose value is one of a binary pair (colour red/blue, shape
circle/square, size small/large, background black/white), c = the full caption, c~ = the caption
with that attribute flipped. Real: CelebA images (``source: celeba``, ``celeba: FOLDER``) with the
six Table 3 attributes, captions from per-attribute phrases. Each image is noised once per seed and
denoised under c and under c~ from that same noised latent; the judge also reads whether the flip
took (``flip_success``) and whether c kept the value (``kept_success``), so a low SDE can be checked
against what actually happened.

Results: ``sde.csv`` (per image and seed), ``summary.csv`` (means with 95% bootstrap CIs over images),
``table.md`` (Table 3 layout) and a bar figure. Each (model, attribute) unit is written atomically and
skipped when present.

    dit-probe run sde
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io import load_config, save_figures, versions, write_csv, write_json
from .stats import mean_ci


@dataclass
class SDEConfig:
    models: list[str] = field(default_factory=lambda: ["toy-mmdit", "toy-unet"])
    source: str = "toy"  # toy | celeba
    celeba: str | None = None
    clip: str | None = None
    attributes: list[str] = field(default_factory=lambda: ["color", "shape", "size", "background"])
    n: int = 40  # images per attribute
    seeds: int = 2  # noise samples per image
    strength: float = 0.75  # the forward timestep t, as a fraction of the schedule
    norm: str = "rms"  # rms (pixels in [0, 1], resolution-independent) or l2 (the paper's literal norm)
    seed: int = 0
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int | None = None
    bootstrap: int = 1000

    def validate(self, source=None):
        from ..adapters.base import check_strength
        from ..metrics.sde import NORMS

        try:
            check_strength(self.strength)
        except ValueError:
            raise ValueError(f"strength {self.strength!r} is outside (0, 1]: it is the forward timestep t as a "
                             "fraction of the schedule (the paper edits at 0.75)") from None
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose from {NORMS}")
        if self.n < 2 or self.seeds < 1:
            raise ValueError(f"need n >= 2 images and seeds >= 1, got n={self.n}, seeds={self.seeds}")
        if source is not None:
            for a in self.attributes:
                source.check(a)


def run_unit(editor, source, attribute: str, cfg: SDEConfig) -> pd.DataFrame:
    from ..metrics.sde import sde

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
    import matplotlib.pyplot as plt

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


def run(cfg: SDEConfig, out="runs/sde", figures=None, log=print) -> pd.DataFrame:
    from ..editing import EIMEditor
    from ..registry import load_pipeline
    from .sources import make_source

    cfg.validate()
    source = make_source(cfg.source, cfg.celeba, cfg.attributes, cfg.clip)
    cfg.validate(source)
    out = Path(out)
    write_json(out / "config.json", asdict(cfg))
    started, frames = time.time(), []
    for model in cfg.models:
        editor = None
        for attr in cfg.attributes:
            path = out / model / f"{attr}.csv"
            if path.exists():
                frames.append(pd.read_csv(path))
                continue
            if editor is None:
                editor = EIMEditor(load_pipeline(model), strength=cfg.strength, num_inference_steps=cfg.num_inference_steps,
                                   guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size)
            t0 = time.time()
            frame = run_unit(editor, source, attr, cfg)
            frame.insert(0, "model", model)
            write_csv(path, frame)
            frames.append(frame)
            log(f"{model} {attr:<10} SDE {frame.sde.mean():.3f}  flip took {frame.flip_success.mean():.0%}  "
                f"({time.time() - t0:.0f} s)")
    rows = pd.concat(frames, ignore_index=True)
    summary = summarise(rows, cfg.bootstrap)
    write_csv(out / "sde.csv", rows)
    write_csv(out / "summary.csv", summary)
    table = markdown_table(summary, cfg.norm)
    (out / "table.md").write_text(table)
    write_json(out / "run.json", {"versions": versions(), "seconds": round(time.time() - started, 1), "norm": cfg.norm})
    fig_dir = save_figures(out, figures, {"sde-table3.png": plot_bars(summary)}, {"sde-table3.md": table})
    log(table)
    log(f"results: {out}  figures: {fig_dir}")
    return summary


def config_from(path=None, **overrides) -> SDEConfig:
    return load_config(SDEConfig, path, **overrides)
