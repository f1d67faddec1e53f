"""Which read-out shows where a word acts, and where is the attribute decided? Attention maps scored against
the toy world's exact masks, and activation patching (issue 24).

Rendered scenes (exact object masks) are encoded, noised to a log-SNR matched per model, and denoised
under their caption while every read-out records, per layer and step:
- ``word``: the recorder's image->text probability map of the word (joint softmax; the default read-out);
- ``word-text``: the same divided by each query's total text probability (``normalise="text"``: the
  share of the query's *text* attention; the same as ``word`` for a UNet's cross-attention);
- ``concept-output`` / ``concept-probability`` (joint-attention models): ConceptAttention's output-space
  map (softmax over the concepts) and the probability map of the same concept tokens
  (``attention.concepts``) of the scene's shape and colour word among 17 concepts (every toy shape and
  colour word, and "background").
Each map is upsampled (bilinear) to the 32 x 32 image and scored against the object's exact mask (pixels
at least half covered) for the shape and the colour word: AUROC of the soft map (chance 0.5), average
precision (chance: the object's area share), IoU of the map thresholded by Otsu's rule, and the pointing
game (the map's maximum inside the object; chance: the area share). Means with 95% bootstrap CIs over
scenes, per read-out and layer (maps averaged over steps); per step, the AUROC of every layer's map.

Activation patching (``causal.patched_generation``, the ``patching`` part): ``patch_n`` random scenes'
captions are generated from noise, and again with each hidden site's states (``adapter.hidden_sites``)
over a window of steps (all, the first half, the second half) taken from the generation of the same
caption with another colour, same noise; the judge reads whether the image now shows the donor's colour.

    dit-probe run localisation --config experiments/localisation-toy.yaml
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from ..attention import concept_maps, record
from ..causal import donor_states, generate, patched_generations
from ..stats import group_cis
from ..toyworld import COLORS, SHAPES, Judge, render_many, scenes
from ..toyworld.judge import at_judge_size
from ..toyworld.world import IMAGE_SIZE, coverage
from .levels import LEVEL_AXES, apply_level, with_level
from .runner import Report, Study, Unit
from .sources import EditorSettings

READOUTS = ("word", "word-text", "concept-output", "concept-probability")
WORDS = ("shape", "color")
# ConceptAttention's concept set: every toy shape and colour word and "background" (one vocabulary for
# every image, as a segmentation by concepts uses it)
CONCEPTS = [*SHAPES, *COLORS, "background"]


WINDOWS = ("all", "early", "late")  # patched steps: all, the first half, the second half


class LocalisationConfig(EditorSettings):
    strengths: list[float] = []
    log_snrs: list[float] = [-1.5]
    readouts: list[str] = list(READOUTS)
    n: int = 48
    seed: int = 0
    # activation patching (causal): generations of scenes whose caption's colour is changed; each hidden
    # site patched from the changed caption's generation over each window of steps
    patch_n: int = 16  # 0: no patching part
    windows: list[str] = list(WINDOWS)

    def check(self):
        super().check()
        bad = [r for r in self.readouts if r not in READOUTS]
        if bad:
            raise ValueError(f"unknown read-out(s) {bad}; read-outs: {list(READOUTS)}")
        if self.n < 2:
            raise ValueError("n must be at least 2 scenes (the CIs resample scenes)")
        bad = [w for w in self.windows if w not in WINDOWS]
        if bad:
            raise ValueError(f"unknown step window(s) {bad}; windows: {list(WINDOWS)}")


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu's rule)."""
    hist, edges = np.histogram(values, bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = ((hist * mids).sum() - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(edges[np.argmax(w0 * w1 * (m0 - m1) ** 2) + 1])  # the upper edge of the lower class's last bin


def score_map(soft: np.ndarray, mask: np.ndarray) -> dict:
    """AUROC, average precision, Otsu IoU and the pointing game of a (H, W) map against a boolean mask."""
    s, m = soft.ravel(), mask.ravel()
    hard = s > otsu_threshold(s)
    return {"auroc": roc_auc_score(m, s), "ap": average_precision_score(m, s),
            "iou": float((hard & m).sum() / max((hard | m).sum(), 1)), "pointing": bool(m[np.argmax(s)]),
            "area": float(m.mean())}


def auroc(soft: np.ndarray, mask: np.ndarray) -> float:
    """AUROC by the rank-sum (Mann-Whitney) identity, ties at average ranks: what roc_auc_score gives, at
    a fraction of its cost for the many per-step maps."""
    r = rankdata(soft.ravel())
    m = mask.ravel()
    pos, neg = m.sum(), (~m).sum()
    return float((r[m].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _setup(cfg: LocalisationConfig, model: str, shared) -> SimpleNamespace:
    return SimpleNamespace(editor=cfg.editor(model))


def _upsample(t: torch.Tensor) -> np.ndarray:
    """(..., h, w) -> (..., 32, 32) bilinear."""
    flat = t.reshape(-1, 1, *t.shape[-2:]).float()
    up = F.interpolate(flat, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return up.reshape(*t.shape[:-2], IMAGE_SIZE, IMAGE_SIZE).numpy()


def _window(window: str, n: int) -> list[int]:
    return {"all": list(range(n)), "early": list(range(n // 2)), "late": list(range(n // 2, n))}[window]


def _patching(ctx, unit: Unit, cfg: LocalisationConfig) -> pd.DataFrame:
    """Per hidden site and window: does the generation of 'a {size} {colour} {shape} ...' show the donor
    caption's colour when the site's states come from the donor's generation (same noise)?"""
    editor, judge = ctx.editor, Judge()
    items = scenes(cfg.patch_n, cfg.seed * 1000 + 5)
    rng = np.random.default_rng(cfg.seed)
    donors = [type(s)(**{**s.to_dict(), "color": rng.choice([c for c in COLORS if c != s.color])}) for s in items]
    call = dict(num_inference_steps=editor.num_inference_steps, guidance_scale=editor.guidance_scale, output_type="np",
                **editor._prompt_kwargs)
    prompts, donor_prompts = [s.caption() for s in items], [d.caption() for d in donors]
    sites = [h.name for h in editor.adapter.hidden_sites()]
    kept = donor_states(editor.pipe, donor_prompts, sites, cfg.seed, **call)
    plain = judge.read(at_judge_size(_uint8(generate(editor.pipe, prompts, cfg.seed, **call))))
    rows = [dict(site="none", window="none", scene=i, flipped=r["color"] == d.color, kept=r["color"] == s.color)
            for i, (r, s, d) in enumerate(zip(plain, items, donors))]
    n_steps = len(kept.steps)
    for site in sites:  # the windows of one site as one batch
        variants = [(site, _window(window, n_steps)) for window in cfg.windows]
        batches = patched_generations(editor.pipe, prompts, donor_prompts, variants, seed=cfg.seed, donor=kept, **call)
        for window, images in zip(cfg.windows, batches):
            reads = judge.read(at_judge_size(_uint8(images)))
            rows += [dict(site=site, window=window, scene=i, flipped=r["color"] == d.color, kept=r["color"] == s.color)
                     for i, (r, s, d) in enumerate(zip(reads, items, donors))]
    frame = pd.DataFrame(rows)
    frame.insert(0, "part", "patching")
    return frame


def _uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def _compute(ctx, unit: Unit, cfg: LocalisationConfig):
    if unit["part"] == "patching":
        frame = _patching(ctx, unit, cfg)
        frame.insert(0, "model", unit.model)
        return frame, None
    editor = ctx.editor
    level = apply_level(editor, unit["level"])
    items = scenes(cfg.n, cfg.seed)
    masks = np.stack([coverage(s) >= 0.5 for s in items])
    enc = editor.encode(render_many(items, editor.size), [s.caption() for s in items],
                        [cfg.seed * 100_000 + i for i in range(cfg.n)])
    joint = hasattr(editor.adapter, "concept_block")
    want_concepts = joint and any(r.startswith("concept") for r in cfg.readouts)
    text = "word-text" in cfg.readouts
    with contextlib.ExitStack() as stack:  # concepts first: they encode their words on entry
        cm = stack.enter_context(concept_maps(editor.pipe, CONCEPTS)) if want_concepts else None
        maps = (stack.enter_context(record(editor.pipe, words={role: [getattr(s, role) for s in items] for role in WORDS},
                                           prompt=[s.caption() for s in items], text_mass=text))
                if text or "word" in cfg.readouts else None)
        editor.reconstruct(enc)
    readouts = {}  # (read-out, role) -> ({layer: (step, image, h, w)}, steps)
    if maps is not None:
        for readout, norm in (("word", None), ("word-text", "text")):
            for role in WORDS:
                readouts[(readout, role)] = ({name: maps.tensor(word=role, layer=name, normalise=norm)[:, 0, 0, :, 0, 0]
                                              for name in maps.layers}, maps.steps)
    if cm is not None:
        for kind in ("output", "probability"):
            t = cm.tensor(kind)  # (step, layer, image, concept, h, w)
            for role in WORDS:
                which = torch.tensor([CONCEPTS.index(getattr(s, role)) for s in items])
                readouts[(f"concept-{kind}", role)] = (
                    {name: t[:, j, torch.arange(len(items)), which] for j, name in enumerate(cm.layers)}, cm.steps)
    rows = []
    for (readout, role), (per_layer, steps) in readouts.items():
        if readout not in cfg.readouts:
            continue
        for name, m in per_layer.items():
            up = _upsample(m)  # (step, image, 32, 32)
            for i in range(len(items)):
                rows.append(dict(scene=i, readout=readout, word=role, layer=name, step="mean",
                                 **score_map(up[:, i].mean(0), masks[i])))
                for k, step in enumerate(steps):  # per step: AUROC only
                    rows.append(dict(scene=i, readout=readout, word=role, layer=name, step=str(step),
                                     auroc=auroc(up[k, i], masks[i]), area=float(masks[i].mean())))
    frame = with_level(pd.DataFrame(rows), level)
    frame.insert(0, "part", "maps")
    frame.insert(0, "model", unit.model)
    return frame, None


def summarise_patching(rows: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model, site and window: the share of generations showing the donor's colour (95% CI over
    scenes); site 'none' is the unpatched generation (the floor)."""
    return group_cis(rows, ["model", "site", "window"], ["flipped"], n_boot, means=["kept"])


def _patching_table(p: pd.DataFrame) -> str:
    windows = [w for w in dict.fromkeys(p.window) if w != "none"]
    lines = ["Activation patching: share of generations that show the donor caption's colour when a hidden site's "
             "states come from the donor's generation (same noise), per window of steps (95% CI over scenes); "
             "'none' = unpatched (the floor).", "",
             "| model | site | " + " | ".join(windows) + " |", "|---|---|" + "---|" * len(windows)]
    for (model, site), g in p.groupby(["model", "site"], sort=False):
        g = g.set_index("window")
        cells = [_ci(g.loc[w], "flipped") if w in g.index else _ci(g.iloc[0], "flipped") if site == "none" else "–"
                 for w in windows]
        lines.append(f"| {model} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(rows: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model, read-out, word and layer (maps averaged over steps): means with 95% CIs over scenes."""
    return group_cis(rows[rows.step == "mean"], ["model", "level", "readout", "word", "layer"],
                     ("auroc", "ap", "iou", "pointing"), n_boot, first=["log_snr"], means=["area"])


def _ci(r, m):
    return f"{r[m]:.2f} [{r[m + '_lo']:.2f}, {r[m + '_hi']:.2f}]"


def _table(summary: pd.DataFrame) -> str:
    lines = ["Maps (mean over steps) against the object's exact mask; 95% bootstrap CIs over scenes. Chance: "
             "AUROC 0.50; AP and pointing game = the object's area share (column 'area').", "",
             "| model | log-SNR | word | read-out | layer | AUROC | AP | Otsu IoU | pointing game | area |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.sort_values(["model", "word", "readout"], kind="stable").to_dict("records"):
        lines.append(f"| {r['model']} | {r['log_snr']:.2f} | {r['word']} | {r['readout']} | {r['layer']} | {_ci(r, 'auroc')} | "
                     f"{_ci(r, 'ap')} | {_ci(r, 'iou')} | {_ci(r, 'pointing')} | {r['area']:.2f} |")
    return "\n".join(lines) + "\n"


def _figure(summary: pd.DataFrame):
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 6.2), squeeze=False)
    for j, model in enumerate(models):
        for i, word in enumerate(WORDS):
            ax = axes[i, j]
            sub = summary[(summary.model == model) & (summary.word == word)]
            layers = list(dict.fromkeys(sub.layer))
            for readout, g in sub.groupby("readout", sort=False):
                x = [layers.index(name) for name in g.layer]
                ax.errorbar(x, g.auroc, yerr=[g.auroc - g.auroc_lo, g.auroc_hi - g.auroc], marker="o", ms=3,
                            capsize=2, label=readout)
            ax.axhline(0.5, color="gray", lw=0.8, ls=":")
            ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=6)
            ax.set_ylim(0.3, 1.02)
            ax.set_title(f"{model}: the {word} word", fontsize=9)
            ax.set_ylabel("AUROC vs the object mask" if j == 0 else "")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _report(cfg: LocalisationConfig, results, out) -> Report:
    frames = [r.frame for r in results]
    rows = pd.concat([f for f in frames if f.part.iloc[0] == "maps"], ignore_index=True)
    summary = summarise(rows, cfg.bootstrap)
    table = _table(summary)
    patched = [f for f in frames if f.part.iloc[0] == "patching"]
    files = {"rows.csv": rows, "summary.csv": summary}
    figures = {"localisation-maps.png": _figure(summary), "localisation-maps-table.md": table}
    if patched:
        p = summarise_patching(pd.concat(patched, ignore_index=True), cfg.bootstrap)
        ptable = _patching_table(p)
        files.update({"patching.csv": pd.concat(patched, ignore_index=True), "patching-summary.csv": p})
        figures["localisation-patching-table.md"] = ptable
        table += "\n" + ptable
    files["table.md"] = table
    return Report(summary, files=files, figures=figures, text=table)


def _line(frame: pd.DataFrame) -> str:
    if frame.part.iloc[0] == "patching":
        g = frame[frame.window == "all"].groupby("site").flipped.mean()
        return "donor colour when patched (all steps): " + ", ".join(f"{k} {v:.0%}" for k, v in g.items())
    m = frame[frame.step == "mean"].groupby(["readout", "word"]).auroc.mean()
    return "AUROC " + ", ".join(f"{r}/{w} {v:.2f}" for (r, w), v in m.items())


STUDY = Study(
    name="localisation", help="attention read-outs (recorder maps, ConceptAttention) scored against exact masks (issue 24)",
    config=LocalisationConfig,
    units=lambda cfg: [Unit(m, (("part", "maps"), ("level", lv))) for m in cfg.models for lv in cfg.levels()]
    + ([Unit(m, (("part", "patching"),)) for m in cfg.models] if cfg.patch_n else []),
    setup=_setup, compute=_compute, report=_report, axes=("models", *LEVEL_AXES),
    paper="ConceptAttention and attention maps vs exact masks (toy pair)", toy_config="localisation-toy.yaml",
    paper_config="localisation-paper.yaml",
    figure_files=("localisation-maps.png", "localisation-maps-table.md", "localisation-patching-table.md"),
    summary_line=_line,
)
run, config_from = STUDY.run, STUDY.config_from
