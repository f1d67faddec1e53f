"""Semantic-loss sweep (paper section 5.4, Fig. 13): which attributes survive forward noising when the
prompt does not name them?

For every image with known attributes and every noise level (a nominal strength, or a log-SNR matched
per model on its own schedule: ``studies.levels``), the image is encoded, noised to that level
with a fixed noise sample per (image, seed), and denoised three ways from the same noised latent:
with the full description, with the description minus one attribute (one variant per attribute), and
with the empty prompt. The judge reads every result. ``retained`` = the judge reads the image's own
value of the attribute. Retention of an attribute is measured where its word is absent (omit, empty)
and, as a control, where it is present (full).

Results: ``retention.csv`` (one row per image, seed, prompt, attribute and level), ``summary.csv``
(retention per model, prompt, attribute and level with a 95% bootstrap CI over images, the
strength, timestep and log-SNR reached, and chance), ``table.md`` and two figures: curves vs strength
and vs log-SNR, and an image grid; one unit per (model, level), run and cached by ``studies.runner``.

    dit-probe run semantic-loss
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..editing import EIMEditor
from ..registry import load_pipeline
from ..stats import mean_ci
from .levels import LEVEL_AXES, LevelSettings, apply_level, with_level
from .runner import Report, Study, Unit
from .sources import make_source, source_for

PROMPTS = ("full", "omit", "empty")


class SemanticLossConfig(LevelSettings):
    source: str = "toy"  # toy | celeba
    celeba: str | None = None  # the CelebA folder (source celeba)
    clip: str | None = None  # the CLIP judge's model for real images (hub id or folder)
    attributes: list[str] = ["color", "shape", "size", "background"]
    strengths: list[float] = [0.15, 0.35, 0.55, 0.75, 0.95]  # or log_snrs: targets matched per model
    prompts: list[str] = list(PROMPTS)
    n: int = 32  # images
    seeds: int = 2  # noise samples per image
    seed: int = 0
    num_inference_steps: int | None = None  # None: the model's default
    guidance_scale: float | None = None
    batch_size: int | None = None
    examples: int = 1  # images shown in the grid figure, per model

    def check(self):
        super().check()
        bad = [p for p in self.prompts if p not in PROMPTS]
        if bad:
            raise ValueError(f"unknown prompt kind(s) {bad}; choose from {list(PROMPTS)}")
        if self.n < 2 or self.seeds < 1:
            raise ValueError(f"need n >= 2 images and seeds >= 1, got n={self.n}, seeds={self.seeds}")


def _setup(cfg: SemanticLossConfig, model: str, source) -> SimpleNamespace:
    pipe = load_pipeline(model)
    size = EIMEditor(pipe).size
    return SimpleNamespace(pipe=pipe, source=source, items=source.sample(cfg.n, cfg.seed, size=size))


def _compute(ctx, unit: Unit, cfg: SemanticLossConfig):
    editor = EIMEditor(ctx.pipe, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                       batch_size=cfg.batch_size)
    level = apply_level(editor, unit["level"])
    frame, examples = run_unit(editor, ctx.source, ctx.items, cfg)
    return with_level(frame.drop(columns=["strength", "log_snr"]), level), examples


def run_unit(editor, source, items, cfg: SemanticLossConfig) -> tuple[pd.DataFrame, dict]:
    """All images, seeds and prompt variants at the editor's strength. Returns the rows and example images."""
    n = len(items)
    images = np.repeat(items.images, cfg.seeds, axis=0)
    labels = [lab for lab in items.labels for _ in range(cfg.seeds)]
    seeds = [cfg.seed * 1_000_003 + i * 101 + j for i in range(n) for j in range(cfg.seeds)]
    full = [source.caption(lab) for lab in labels]
    enc = editor.encode(images, full, seeds)  # one noised latent per (image, seed), shared by every prompt
    variants = []  # (prompt kind, omitted attribute, prompts, attributes measured)
    if "full" in cfg.prompts:
        variants.append(("full", "", full, cfg.attributes))
    if "omit" in cfg.prompts:
        variants += [("omit", a, [source.caption(lab, drop=(a,)) for lab in labels], [a]) for a in cfg.attributes]
    if "empty" in cfg.prompts:
        variants.append(("empty", "", [""] * len(labels), cfg.attributes))
    t = float(enc.t)
    log_snr = float(editor.adapter.log_snr(enc.t))
    rows, examples = [], {"source": items.images[:cfg.examples]}
    judge = source.judge
    for kind, omitted, prompts, measured in variants:
        out = editor.reconstruct(enc, prompts)
        reads, scores = judge.readings(out)
        examples[f"no-{omitted}" if omitted else kind] = out[: cfg.examples * cfg.seeds: cfg.seeds]
        for k, (lab, read) in enumerate(zip(labels, reads)):
            for a in measured:
                values = list(judge.attributes[a])
                rows.append({"image": k // cfg.seeds, "noise": k % cfg.seeds, "prompt": kind, "omitted": omitted,
                             "attribute": a, "value": lab[a], "read": read[a], "retained": read[a] == lab[a],
                             "score": float(scores[a][k, values.index(lab[a])])})
    frame = pd.DataFrame(rows)
    frame.insert(0, "log_snr", log_snr)
    frame.insert(0, "timestep", t)
    frame.insert(0, "strength", editor.strength)
    return frame, examples


def summarise(rows: pd.DataFrame, values: dict, n_boot: int = 1000) -> pd.DataFrame:
    """Retention per model, prompt, attribute and strength: mean over images (each image's seeds averaged
    first, so the CI is over images), with chance = 1 / number of values."""
    rng = np.random.default_rng(0)
    keys = ["model", "prompt", "attribute", "level"]
    out = []
    for key, g in rows.groupby(keys, sort=False):
        per_image = g.groupby("image").retained.mean()
        m, lo, hi = mean_ci(per_image.values, n_boot, rng)
        out.append({**dict(zip(keys, key)), "strength": g.strength.iloc[0], "timestep": g.timestep.iloc[0],
                    "log_snr": g.log_snr.iloc[0], "paper_start": bool(g.paper_start.iloc[0]),
                    "retention": m, "retention_lo": lo, "retention_hi": hi, "images": len(per_image),
                    "samples": len(g), "chance": 1.0 / len(values[key[2]])})
    return pd.DataFrame(out).sort_values(["model", "prompt", "attribute", "log_snr"]).reset_index(drop=True)


def markdown_table(summary: pd.DataFrame) -> str:
    """Retention of each attribute when its word is omitted, per model and level, with its 95% CI (full prompt
    in brackets) and the log-SNR each model reached at that level."""
    levels = list(dict.fromkeys(summary.sort_values("log_snr").level))
    lines = ["| model | attribute | " + " | ".join(levels) + " | chance |", "|---|---|" + "---|" * (len(levels) + 1)]
    for (model, attr), g in summary.groupby(["model", "attribute"], sort=False):
        cells = []
        for lv in levels:
            om = g[(g.prompt == "omit") & (g.level == lv)]
            fu = g[(g.prompt == "full") & (g.level == lv)]
            cell = (f"{om.retention.iloc[0]:.0%} [{om.retention_lo.iloc[0]:.0%}, {om.retention_hi.iloc[0]:.0%}]"
                    if len(om) else "–")
            if len(fu):
                cell += f" ({fu.retention.iloc[0]:.0%})"
            cells.append(cell)
        lines.append(f"| {model} | {attr} | " + " | ".join(cells) + f" | {g.chance.iloc[0]:.0%} |")
    reached = summary.drop_duplicates(["model", "level"])
    lines += ["", "log-SNR reached per level: " + "; ".join(
        f"{lv}: " + ", ".join(f"{r.model} {r.log_snr:.2f}" for r in reached[reached.level == lv].itertuples())
        for lv in levels) + "."]
    return "\n".join(lines) + "\n"


def plot_curves(summary: pd.DataFrame):
    """Fig. 13-style curves: retention vs strength and vs log-SNR; omit solid, full dashed, empty dotted."""
    models = list(dict.fromkeys(summary.model))
    attrs = list(dict.fromkeys(summary.attribute))
    colours = dict(zip(attrs, plt.cm.tab10.colors))
    styles = {"omit": "-", "full": "--", "empty": ":"}
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, x in enumerate(["strength", "log_snr"]):
            ax = axes[i, j]
            for (prompt, attr), g in summary[summary.model == model].groupby(["prompt", "attribute"], sort=False):
                g = g.sort_values("log_snr", ascending=False)
                ax.plot(g[x], g.retention, styles[prompt], color=colours[attr], marker="o", ms=3,
                        label=f"{attr} ({prompt})")
                if prompt == "omit":
                    ax.fill_between(g[x], g.retention_lo, g.retention_hi, color=colours[attr], alpha=0.15)
            for attr in attrs:
                ax.axhline(summary[summary.attribute == attr].chance.iloc[0], color=colours[attr], lw=0.6, alpha=0.5)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("forward strength" if x == "strength" else "log-SNR at that strength")
            if x == "log_snr":
                ax.invert_xaxis()  # more noise to the right in both panels
            ax.set_ylabel("retention")
            ax.set_title(f"{model}: attribute kept after noising and denoising", fontsize=9)
    axes[0, 1].legend(fontsize=6, ncol=2, loc="lower left")
    fig.suptitle("Semantic loss: solid = attribute word omitted (95% CI), dashed = full prompt, dotted = empty "
                 "prompt; thin lines = chance", fontsize=9)
    fig.tight_layout()
    return fig


def plot_grid(examples: dict, strengths: list[str]):
    """Per model: rows = levels, columns = source, full, each omit variant, empty (first example image)."""
    models = list(examples)
    cols = list(examples[models[0]][strengths[0]])
    fig, axes = plt.subplots(len(models) * len(strengths), len(cols),
                             figsize=(1.2 * len(cols), 1.25 * len(models) * len(strengths)), squeeze=False)
    for m, model in enumerate(models):
        for r, s in enumerate(strengths):
            row = m * len(strengths) + r
            for c, col in enumerate(cols):
                ax = axes[row, c]
                ax.imshow(examples[model][s][col][0], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(col.replace("no-", "no "), fontsize=7)
                if c == 0:
                    ax.set_ylabel(f"{model}\n{s}", fontsize=6)
    fig.tight_layout(pad=0.2)
    return fig


def _report(cfg: SemanticLossConfig, results, out) -> Report:
    rows = pd.concat([r.frame for r in results], ignore_index=True)
    rows["omitted"] = rows["omitted"].fillna("")
    summary = summarise(rows, make_source(cfg.source, cfg.celeba, cfg.attributes, cfg.clip).values, cfg.bootstrap)
    examples = {}
    for r in results:
        examples.setdefault(r.unit.model, {})[r.unit["level"]] = r.arrays
    table = markdown_table(summary)
    return Report(summary, files={"retention.csv": rows, "summary.csv": summary, "table.md": table},
                  figures={"semantic-loss-curves.png": plot_curves(summary),
                           "semantic-loss-grid.png": plot_grid(examples, cfg.levels()),
                           "semantic-loss-table.md": table}, text=table)


def _line(frame: pd.DataFrame) -> str:
    om = frame[frame.prompt == "omit"].groupby("attribute").retained.mean()
    return "retention with the word omitted " + ", ".join(f"{a} {v:.0%}" for a, v in om.items())


STUDY = Study(
    name="semantic-loss", help="attribute retention vs forward strength with full / omit / empty prompts (Fig. 13)",
    config=SemanticLossConfig,
    units=lambda cfg: [Unit(m, (("level", lv),)) for m in cfg.models for lv in cfg.levels()],
    prepare=lambda cfg, out: source_for(cfg), setup=_setup, compute=_compute, report=_report,
    axes=("models", *LEVEL_AXES), revision=2,  # 2: noise levels (strengths or matched log-SNRs)
    paper="Fig. 13: attributes lost with forward strength when unnamed", toy_config="semantic-loss-toy.yaml",
    paper_config="semantic-loss-paper.yaml",
    figure_files=("semantic-loss-curves.png", "semantic-loss-grid.png", "semantic-loss-table.md"),
    read_csv={"keep_default_na": False}, summary_line=_line,
)
run, config_from = STUDY.run, STUDY.config_from
