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

Results: ``edits.csv`` (one row per edit and alpha), ``summary.csv`` (means with 95% bootstrap CIs
over edits), ``table.md`` and a curves figure. Each (model, mode, attribute) unit is written
atomically and skipped when present, so an interrupted run resumes.

    dit-probe run toy-edits
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io import load_config, save_figures, versions, write_csv, write_json
from .stats import mean_ci

EDITABLE = ("color", "size", "shape")


@dataclass
class ToyEditConfig:
    models: list[str] = field(default_factory=lambda: ["toy-mmdit", "toy-unet"])
    attributes: list[str] = field(default_factory=lambda: list(EDITABLE))
    modes: list[str] = field(default_factory=lambda: ["eim", "prompt-only", "hsds-only", "dds"])
    n: int = 30  # edits per attribute
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5])
    strength: float = 0.75
    seed: int = 0  # scenes, targets and noise
    bidirectional: bool = True  # eim only: +1 then -1
    # image-side settings (DistillSettings); None keeps the editor's default
    sign: str | None = None
    cfg_in_eps: bool | None = None
    lam: float | None = None
    iterations: int | None = None
    batch_size: int | None = None
    bootstrap: int = 1000

    def validate(self):
        from ..editing import MODES

        bad = [a for a in self.attributes if a not in EDITABLE]
        if bad:
            raise ValueError(f"attributes {bad} cannot be edited in the toy world; choose from {list(EDITABLE)}")
        bad = [m for m in self.modes if m not in MODES or m == "reference"]
        if bad:
            raise ValueError(f"modes {bad} are not available here; choose from {[m for m in MODES if m != 'reference']}")
        if self.n < 2:
            raise ValueError(f"n must be >= 2 edits per attribute, got {self.n}")
        if 1.0 not in [float(a) for a in self.alphas]:
            raise ValueError("alphas must include 1.0 (success is read at alpha = 1)")

    def distill(self):
        from ..editing import DistillSettings

        d = DistillSettings()
        for ours, theirs in (("sign", "sign"), ("cfg_in_eps", "cfg"), ("lam", "lam"), ("iterations", "iterations")):
            if getattr(self, ours) is not None:
                setattr(d, theirs, getattr(self, ours))
        return d


def edit_set(attribute: str, n: int, seed: int):
    """n (source scene, target scene) pairs that differ only in ``attribute`` (the target value uniform
    over the other values)."""
    from ..toyworld import ATTRIBUTES, scenes

    rng = random.Random(seed * 7919 + EDITABLE.index(attribute))
    pairs = []
    for s in scenes(n, seed=seed * 1000 + EDITABLE.index(attribute)):
        value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(s, attribute)])
        pairs.append((s, type(s)(**{**s.to_dict(), attribute: value})))
    return pairs


def phrase_for(scene, attribute: str) -> str:
    """The target attribute alone, as an in-distribution toy caption: 'a blue shape', 'a large shape', 'a star'."""
    from ..toyworld.world import ATTRIBUTES

    return scene.caption(drop=tuple(a for a in ATTRIBUTES if a != attribute))


def background_mask(source, target) -> np.ndarray:
    """Pixels that are background in both renders (no object coverage in either)."""
    from ..toyworld.world import coverage

    return (coverage(source) == 0) & (coverage(target) == 0)


def judge_edits(judge, images, sources: list[dict], targets: list[dict], attribute, alphas, sources_rgb, masks):
    """One row per (edit, alpha): the judge's reading of every edited image against the source and target
    labels (attribute -> value dicts). Works with any judge (toy or CLIP)."""
    from ..metrics import psnr, ssim

    values = judge.attributes
    n, a = images.shape[:2]
    flat = images.reshape(n * a, *images.shape[2:])
    reads, scores = judge.readings(flat)
    others = [x for x in values if x != attribute]
    rows = []
    for i, (src, tgt) in enumerate(zip(sources, targets)):
        value = tgt[attribute]
        ref, mask = np.repeat(sources_rgb[i][None], a, 0), np.repeat(masks[i][None], a, 0)
        p, q = psnr(ref, images[i], mask), ssim(ref, images[i], mask)
        for k, alpha in enumerate(alphas):
            r = reads[i * a + k]
            rows.append({
                "edit": i, "alpha": float(alpha), "source_value": src[attribute], "target_value": value,
                "target_score": float(scores[attribute][i * a + k, list(values[attribute]).index(value)]),
                "read": r[attribute], "success": r[attribute] == value,
                "preserved": all(r[x] == src[x] for x in others),
                **{f"kept_{x}": r[x] == src[x] for x in others},
                **{f"read_{x}": r[x] for x in values},
                "background_psnr": float(p[k]), "background_ssim": float(q[k]),
            })
    return rows


@dataclass
class EditBatch:
    """One attribute's edits in one mode: the pairs, their renders and masks, Encode's and Identify's
    outputs, and the edited images (edits, alphas, H, W, 3)."""

    pairs: list
    sources: np.ndarray
    masks: np.ndarray
    seeds: list[int]
    enc: object
    direction: object
    images: np.ndarray


def edit_batch(editor, attribute: str, mode: str, n: int, seed: int, alphas) -> EditBatch:
    """Encode, Identify and Manipulate for ``n`` toy edits of ``attribute`` at every alpha (one batch)."""
    from ..toyworld import render_many

    pairs = edit_set(attribute, n, seed)
    sources = render_many([s for s, _ in pairs])
    masks = np.stack([background_mask(s, t) for s, t in pairs])
    seeds = [seed * 100_000 + i for i in range(len(pairs))]
    enc = editor.encode(sources, [s.caption() for s, _ in pairs], seeds)
    direction = editor.identify(enc, [t.caption() for _, t in pairs], mode, [phrase_for(t, attribute) for _, t in pairs])
    return EditBatch(pairs, sources, masks, seeds, enc, direction, editor.manipulate(enc, direction, alphas))


def run_unit(editor, judge, attribute: str, mode: str, cfg: ToyEditConfig) -> pd.DataFrame:
    """All edits of one attribute in one mode with one model."""
    b = edit_batch(editor, attribute, mode, cfg.n, cfg.seed, cfg.alphas)
    pairs, seeds, images = b.pairs, b.seeds, b.images
    rows = judge_edits(judge, images, [s.attributes for s, _ in pairs], [t.attributes for _, t in pairs], attribute,
                       cfg.alphas, b.sources, b.masks)
    direction = b.direction
    frame = pd.DataFrame(rows)
    if cfg.bidirectional and mode == "eim":
        k = [float(a) for a in cfg.alphas].index(1.0)
        back_enc = editor.encode(images[:, k], [t.caption() for _, t in pairs], seeds)
        back = editor.manipulate(back_enc, direction, [-1.0])
        reads = judge.read(back[:, 0])
        frame["returned"] = np.repeat([r[attribute] == getattr(s, attribute) for r, (s, _) in zip(reads, pairs)],
                                      len(cfg.alphas))
    frame.insert(0, "attribute", attribute)
    frame.insert(0, "mode", mode)
    return frame


def summarise(edits: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    """Means with 95% bootstrap CIs over edits, per model, mode, attribute and alpha."""
    rng = np.random.default_rng(0)
    rows = []
    measures = ["target_score", "success", "preserved", "background_psnr", "background_ssim"] + (["returned"] if "returned" in edits else [])
    for key, g in edits.groupby(["model", "mode", "attribute", "alpha"], sort=False):
        row = dict(zip(["model", "mode", "attribute", "alpha"], key), n=len(g))
        for m in measures:
            if m == "returned" and g[m].isna().all():
                continue
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        rows.append(row)
    return pd.DataFrame(rows)


def _change(at0, at1, key, fmt) -> str:
    """'value at alpha 0 -> value at alpha 1' (only the latter when alpha 0 was not run)."""
    return (fmt.format(at0[key]) + " → " if at0 is not None else "") + fmt.format(at1[key])


def markdown_table(summary: pd.DataFrame) -> str:
    """Success and preservation at alpha = 1, the score slope, and bidirectional return, per model and mode."""
    lines = ["| model | mode | attribute | target score α=0 → 1 | success α=1 | others preserved α=0 → 1 | "
             "background PSNR α=0 → 1 (dB) | returned (+1 then −1) |", "|---|---|---|---|---|---|---|---|"]
    for (model, mode, attr), g in summary.groupby(["model", "mode", "attribute"], sort=False):
        a0, a1 = g[g.alpha == 0.0], g[g.alpha == 1.0]
        if a1.empty:
            continue
        r = a1.iloc[0]
        z = a0.iloc[0] if not a0.empty else None
        ret = f"{r.returned:.0%}" if pd.notna(r.get("returned")) else "–"
        lines.append(f"| {model} | {mode} | {attr} | {_change(z, r, 'target_score', '{:.2f}')} | "
                     f"{r.success:.0%} [{r.success_lo:.0%}, {r.success_hi:.0%}] | {_change(z, r, 'preserved', '{:.0%}')} | "
                     f"{_change(z, r, 'background_psnr', '{:.1f}')} | {ret} |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: pd.DataFrame):
    import matplotlib.pyplot as plt

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


def run(cfg: ToyEditConfig, out="runs/toy-edits", figures=None, log=print) -> pd.DataFrame:
    from ..editing import EIMEditor
    from ..registry import load_pipeline
    from ..toyworld import Judge

    cfg.validate()
    out = Path(out)
    write_json(out / "config.json", asdict(cfg))
    judge, started, frames = Judge(), time.time(), []
    for model in cfg.models:
        editor = None
        for mode in cfg.modes:
            for attr in cfg.attributes:
                path = out / model / f"{mode}--{attr}.csv"
                if path.exists():
                    frames.append(pd.read_csv(path))
                    continue
                if editor is None:
                    editor = EIMEditor(load_pipeline(model), strength=cfg.strength, distill=cfg.distill(),
                                       batch_size=cfg.batch_size)
                t0 = time.time()
                frame = run_unit(editor, judge, attr, mode, cfg)
                frame.insert(0, "model", model)
                write_csv(path, frame)
                frames.append(frame)
                a1 = frame[frame.alpha == 1.0]
                log(f"{model} {mode:<11} {attr:<6} success@1 {a1.success.mean():.0%}  preserved {a1.preserved.mean():.0%}"
                    f"  score {frame[frame.alpha == 0].target_score.mean():.2f} -> {a1.target_score.mean():.2f}"
                    f"  ({time.time() - t0:.0f} s)")
    edits = pd.concat(frames, ignore_index=True)
    summary = summarise(edits, cfg.bootstrap)
    write_csv(out / "edits.csv", edits)
    write_csv(out / "summary.csv", summary)
    table = markdown_table(summary)
    (out / "table.md").write_text(table)
    write_json(out / "run.json", {"versions": versions(), "seconds": round(time.time() - started, 1),
                                  "distill": cfg.distill().as_dict()})
    fig_dir = save_figures(out, figures, {"editing-toy-curves.png": plot_curves(summary)}, {"editing-toy-table.md": table})
    write_csv(fig_dir / "editing-toy-summary.csv", summary)
    log(table)
    return summary


def config_from(path=None, **overrides) -> ToyEditConfig:
    return load_config(ToyEditConfig, path, **overrides)
