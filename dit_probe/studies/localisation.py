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

The causal parts (``localisation_causal``), per attribute (colour, shape, size): activation patching of
every hidden site and text input over windows of steps (``patching``); per text-reading layer, LocoGen's
text swap, withholding the word (one layer, all, top/bottom/random-K by attention contribution) and head
knockout (``layers``); and the rank agreement between the read-outs' layer rankings and the causal ones.

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

from ..attention import concept_maps, presets, record
from ..causal import generate
from ..stats import group_cis
from ..toyworld import COLORS, SHAPES, render_many, scenes
from ..toyworld import Judge
from ..toyworld.judge import at_judge_size
from ..toyworld.world import IMAGE_SIZE, coverage
from . import localisation_causal as causal
from .localisation_causal import CAUSAL_ATTRIBUTES, WINDOWS
from .levels import LEVEL_AXES, apply_level, with_level
from .runner import Report, Study, Unit
from .sources import EditorSettings

READOUTS = ("word", "word-text", "concept-output", "concept-probability", "default", "paper", "daam")
# read-outs of one map per image from every layer and step (``attention.presets``), scored as layer "all"
AGGREGATES = ("default", "paper", "daam")
WORDS = ("shape", "color")
# ConceptAttention's concept set: every toy shape and colour word and "background" (one vocabulary for
# every image, as a segmentation by concepts uses it)
CONCEPTS = [*SHAPES, *COLORS, "background"]


class LocalisationConfig(EditorSettings):
    strengths: list[float] = []
    log_snrs: list[float] = [-1.5]
    readouts: list[str] = list(READOUTS)
    n: int = 48
    generate_n: int = 24  # maps recorded while generating captions from noise, scored against the judge's segmentation
    seed: int = 0
    # activation patching: generations whose caption's attribute is changed; each hidden site and text
    # input patched from the changed caption's generation over each window of steps
    patch_n: int = 16  # 0: no patching part
    patch_attributes: list[str] = list(CAUSAL_ATTRIBUTES)
    windows: list[str] = list(WINDOWS)
    # per text-reading layer: text swap, withholding, head knockout (generations per attribute; 0: off)
    layers_n: int = 16
    attributes: list[str] = list(CAUSAL_ATTRIBUTES)
    rank_n: int = 16  # other scenes, on which the word's attention contribution ranks the layers
    swap_widths: list[int] | None = None  # text-swap windows of these many layers, and all; None: every width
    withhold_k: list[int] = [1, 2]
    random_draws: int = 4  # random K-layer sets per K
    heads: list[str] = list(CAUSAL_ATTRIBUTES)  # attributes for which every head is knocked out

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
        bad = [a for a in [*self.attributes, *self.patch_attributes, *self.heads] if a not in CAUSAL_ATTRIBUTES]
        if bad:
            raise ValueError(f"unknown attribute(s) {bad}; the causal parts change one of {list(CAUSAL_ATTRIBUTES)}")
        if self.layers_n and self.rank_n < 1:
            raise ValueError("rank_n must be at least 1 scene to rank the layers by attention contribution")
        for name in ("withhold_k", "swap_widths"):
            if any(k < 1 for k in getattr(self, name) or []):
                raise ValueError(f"{name} must be layer counts of at least 1, got {getattr(self, name)}")


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The threshold that maximises the between-class variance of ``values`` (Otsu's rule)."""
    hist, edges = np.histogram(values, bins=bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = ((hist * mids).sum() - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(edges[np.argmax(w0 * w1 * (m0 - m1) ** 2) + 1])  # the upper edge of the lower class's last bin


def best_iou(soft: np.ndarray, mask: np.ndarray) -> float:
    """The IoU of the map thresholded at its best threshold (an oracle's choice, the ceiling of any rule):
    the pixels at or above each distinct value in turn, from the top."""
    s, m = soft.ravel(), mask.ravel()
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(m[order])
    k = np.arange(1, len(s) + 1)
    ends = np.r_[s[order][1:] != s[order][:-1], True]  # the last pixel of each run of equal values
    return float((tp / (k + m.sum() - tp))[ends].max())


def score_map(soft: np.ndarray, mask: np.ndarray) -> dict:
    """AUROC, average precision, Otsu and best-threshold IoU and the pointing game of a (H, W) map against a
    boolean mask."""
    s, m = soft.ravel(), mask.ravel()
    hard = s > otsu_threshold(s)
    return {"auroc": roc_auc_score(m, s), "ap": average_precision_score(m, s),
            "iou": float((hard & m).sum() / max((hard | m).sum(), 1)), "best_iou": best_iou(soft, mask),
            "pointing": bool(m[np.argmax(s)]), "area": float(m.mean())}


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


def _record_readouts(editor, cfg: LocalisationConfig, items, run) -> dict:
    """Every read-out of ``cfg.readouts`` recorded while ``run()`` denoises ``items``' captions:
    (read-out, word role) -> ({layer: (step, image, h, w)}, steps)."""
    joint = hasattr(editor.adapter, "concept_block")
    want_concepts = joint and any(r.startswith("concept") for r in cfg.readouts)
    text = "word-text" in cfg.readouts
    daam = "daam" in cfg.readouts and editor.adapter.family == "unet"  # DAAM's recipe is for UNets
    with contextlib.ExitStack() as stack:  # concepts first: they encode their words on entry
        cm = stack.enter_context(concept_maps(editor.pipe, CONCEPTS)) if want_concepts else None
        maps = (stack.enter_context(record(editor.pipe, words={role: [getattr(s, role) for s in items] for role in WORDS},
                                           prompt=[s.caption() for s in items], text_mass=text,
                                           heads="keep" if daam else "mean"))
                if set(cfg.readouts) & {"word", "word-text", *AGGREGATES} else None)
        run()
    readouts = {}  # (read-out, role) -> ({layer: (step, image, h, w)}, steps)
    if maps is not None:
        for readout, norm in (("word", None), ("word-text", "text")):
            if readout == "word-text" and not text:
                continue  # the text mass was not recorded
            for role in WORDS:
                readouts[(readout, role)] = ({name: maps.tensor(word=role, layer=name, normalise=norm)[:, 0, 0, :, :, 0].mean(2)
                                              for name in maps.layers}, maps.steps)
        for role in WORDS:  # the aggregates: one map per image, as "one step" of layer "all"
            grid = max(maps.grids.values(), key=lambda g: g[0] * g[1])
            # AttentionMaps.word_map's aggregate: every layer resized to the largest grid, mean over layers, steps, heads
            every = torch.stack([maps.tensor(word=role, layer=n, grid=grid)[:, 0, 0, :, :, 0].mean(2) for n in maps.layers])
            per = {"default": lambda i: every[:, :, i].mean((0, 1)),
                   "paper": lambda i: presets.paper(maps, role, grid=grid, batch=i)}
            if daam:
                latent = editor.size // editor.adapter.vae_scale_factor
                per["daam"] = lambda i: presets.daam(maps, [role], latent * latent, batch=i)
            for readout, fn in per.items():
                readouts[(readout, role)] = ({"all": torch.stack([fn(i) for i in range(len(items))])[None]}, [])
    if cm is not None:
        for kind in ("output", "probability"):
            t = cm.tensor(kind)  # (step, layer, image, concept, h, w)
            for role in WORDS:
                which = torch.tensor([CONCEPTS.index(getattr(s, role)) for s in items])
                readouts[(f"concept-{kind}", role)] = (
                    {name: t[:, j, torch.arange(len(items)), which] for j, name in enumerate(cm.layers)}, cm.steps)
    return readouts


def _score(readouts: dict, cfg: LocalisationConfig, masks: np.ndarray) -> list[dict]:
    """Each map (mean over steps, and per step: AUROC) against each image's object mask."""
    rows = []
    for (readout, role), (per_layer, steps) in readouts.items():
        if readout not in cfg.readouts:
            continue
        for name, m in per_layer.items():
            up = _upsample(m)  # (step, image, 32, 32)
            for i in range(len(masks)):
                if masks[i].all() or not masks[i].any():
                    continue  # no object found, or nothing else: a map cannot be scored against it
                rows.append(dict(scene=i, readout=readout, word=role, layer=name, step="mean",
                                 **score_map(up[:, i].mean(0), masks[i])))
                for k, step in enumerate(steps):  # per step: AUROC only
                    rows.append(dict(scene=i, readout=readout, word=role, layer=name, step=str(step),
                                     auroc=auroc(up[k, i], masks[i]), area=float(masks[i].mean())))
    return rows


def _compute(ctx, unit: Unit, cfg: LocalisationConfig):
    if unit["part"] in ("patching", "layers"):
        part = causal.patching_part if unit["part"] == "patching" else causal.layers_part
        frame = part(ctx.editor, cfg, unit["attribute"])
        frame.insert(0, "attribute", unit["attribute"])
        frame.insert(0, "part", unit["part"])
        frame.insert(0, "model", unit.model)
        return frame, None
    editor = ctx.editor
    if unit["part"] == "generated":
        # captions generated from noise; the mask is the judge's segmentation of the generated image
        items = scenes(cfg.generate_n, cfg.seed * 1000 + 8)
        prompts = [s.caption() for s in items]
        call = dict(num_inference_steps=editor.num_inference_steps, guidance_scale=editor.guidance_scale,
                    output_type="np", **editor._prompt_kwargs)
        holder = {}
        readouts = _record_readouts(editor, cfg, items, lambda: holder.update(images=generate(editor.pipe, prompts, cfg.seed, **call)))
        images = at_judge_size((np.asarray(holder["images"]) * 255).round().clip(0, 255).astype(np.uint8))
        masks = Judge.segment(images)
        level = {"level": "generate", "target_log_snr": np.nan, "strength": 1.0, "log_snr": np.nan, "paper_start": False}
    else:
        level = apply_level(editor, unit["level"])
        items = scenes(cfg.n, cfg.seed)
        masks = np.stack([coverage(s) >= 0.5 for s in items])
        enc = editor.encode(render_many(items, editor.size), [s.caption() for s in items],
                            [cfg.seed * 100_000 + i for i in range(cfg.n)])
        readouts = _record_readouts(editor, cfg, items, lambda: editor.reconstruct(enc))
    rows = _score(readouts, cfg, masks)
    frame = with_level(pd.DataFrame(rows), level)
    frame.insert(0, "part", "maps")
    frame.insert(0, "model", unit.model)
    return frame, None


def summarise(rows: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model, read-out, word and layer (maps averaged over steps): means with 95% CIs over scenes."""
    return group_cis(rows[rows.step == "mean"], ["model", "level", "readout", "word", "layer"],
                     ("auroc", "ap", "iou", "best_iou", "pointing"), n_boot, first=["log_snr"], means=["area"])


_ci = causal._ci


def _table(summary: pd.DataFrame) -> str:
    lines = ["Maps (mean over steps) against the object's exact mask of rendered scenes re-generated from a log-SNR, "
             "or ('generated') against the judge's segmentation of images generated from noise; 95% bootstrap CIs "
             "over scenes. Chance: AUROC 0.50; AP and pointing game = the object's area share (column 'area').", "",
             "| model | log-SNR | word | read-out | layer | AUROC | AP | Otsu IoU | best IoU | pointing game | area |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.sort_values(["model", "word", "readout"], kind="stable").to_dict("records"):
        where = f"{r['log_snr']:.2f}" if np.isfinite(r["log_snr"]) else "generated"
        lines.append(f"| {r['model']} | {where} | {r['word']} | {r['readout']} | {r['layer']} | {_ci(r, 'auroc')} | "
                     f"{_ci(r, 'ap')} | {_ci(r, 'iou')} | {_ci(r, 'best_iou')} | {_ci(r, 'pointing')} | {r['area']:.2f} |")
    return "\n".join(lines) + "\n"


def _figure(summary: pd.DataFrame):
    """AUROC per layer and read-out at the first re-generation level (the generated images: in the tables)."""
    summary = summary[summary.level == summary.level.iloc[0]]
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 6.2), squeeze=False)
    for j, model in enumerate(models):
        for i, word in enumerate(WORDS):
            ax = axes[i, j]
            sub = summary[(summary.model == model) & (summary.word == word)]
            layers = list(dict.fromkeys(sub.layer))
            for readout, g in sub.groupby("readout", sort=False):
                x = [layers.index(name) for name in g.layer]
                yerr = np.clip([g.auroc - g.auroc_lo, g.auroc_hi - g.auroc], 0, None)  # a small bootstrap may miss the mean
                ax.errorbar(x, g.auroc, yerr=yerr, marker="o", ms=3,
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
    parts = {}
    for r in results:
        parts.setdefault(r.frame.part.iloc[0], []).append(r.frame)
    rows = pd.concat(parts["maps"], ignore_index=True)
    summary = summarise(rows, cfg.bootstrap)
    table = _table(summary)
    files = {"rows.csv": rows, "summary.csv": summary}
    figures = {"localisation-maps.png": _figure(summary), "localisation-maps-table.md": table}
    if "patching" in parts:
        patched = pd.concat(parts["patching"], ignore_index=True)
        p = causal.summarise_patching(patched, cfg.bootstrap)
        ptable = causal.patching_table(p)
        files.update({"patching.csv": patched, "patching-summary.csv": p})
        figures["localisation-patching-table.md"] = ptable
        table += "\n" + ptable
    if "layers" in parts:
        layered = pd.concat(parts["layers"], ignore_index=True)
        s = causal.summarise_layers(layered, cfg.bootstrap)
        small = causal.smallest_flipping_window(s)
        regenerated = rows.level != "generate"  # map quality at the re-generation level, exact masks
        agree = causal.agreement(layered, rows[regenerated], cfg.bootstrap)
        ltable = causal.layers_table(s, small, agree)
        files.update({"layers.csv": layered, "layers-summary.csv": s, "agreement.csv": agree})
        figures.update({"localisation-layers-table.md": ltable,
                        "localisation-layers.png": causal.figure(s, summary[summary.level != "generate"])})
        table += "\n" + ltable
    files["table.md"] = table
    return Report(summary, files=files, figures=figures, text=table)


def _line(frame: pd.DataFrame) -> str:
    if frame.part.iloc[0] == "patching":
        g = frame[frame.window == "all"].groupby("site").flipped.mean()
        return "donor value when patched (all steps): " + ", ".join(f"{k} {v:.0%}" for k, v in g.items())
    if frame.part.iloc[0] == "layers":
        g = frame[(frame.kind == "swap") & (frame.k == 1)].groupby("variant").flipped.mean()
        return "donor value when one layer's text is swapped: " + ", ".join(f"{k} {v:.0%}" for k, v in g.items())
    m = frame[frame.step == "mean"].groupby(["readout", "word"]).auroc.mean()
    return "AUROC " + ", ".join(f"{r}/{w} {v:.2f}" for (r, w), v in m.items())


# the settings each part reads; a unit ignores the other parts' (so changing one part recomputes only it)
_PART_FIELDS = {
    "maps": {"readouts", "n"},
    "generated": {"readouts", "generate_n"},
    "patching": {"patch_n", "patch_attributes", "windows"},
    "layers": {"layers_n", "attributes", "rank_n", "swap_widths", "withhold_k", "random_draws", "heads"},
}


def _ignores(unit: Unit) -> set[str]:
    return set().union(*_PART_FIELDS.values()) - _PART_FIELDS[unit["part"]]


def _units(cfg: LocalisationConfig) -> list[Unit]:
    units = [Unit(m, (("part", "maps"), ("level", lv))) for m in cfg.models for lv in cfg.levels()]
    if cfg.generate_n:
        units += [Unit(m, (("part", "generated"),)) for m in cfg.models]
    for part, n, attributes in (("patching", cfg.patch_n, cfg.patch_attributes), ("layers", cfg.layers_n, cfg.attributes)):
        if n:
            units += [Unit(m, (("part", part), ("attribute", a))) for m in cfg.models for a in attributes]
    return units


STUDY = Study(
    name="localisation", help="attention read-outs (recorder maps, ConceptAttention, attention contribution) against "
    "exact masks and causal localisation (patching, text swap, withholding, head knockout)",
    config=LocalisationConfig,
    units=_units,
    setup=_setup, compute=_compute, report=_report, axes=("models", *LEVEL_AXES),
    paper="read-outs (maps, presets, ConceptAttention, attention contribution) vs exact masks, and where an attribute "
    "is decided (patching, text swap, withholding, head knockout), toy pair", toy_config="localisation-toy.yaml",
    paper_config="localisation-paper.yaml",
    figure_files=("localisation-maps.png", "localisation-maps-table.md", "localisation-patching-table.md",
                  "localisation-layers.png", "localisation-layers-table.md"),
    summary_line=_line, ignores=_ignores,
)
run, config_from = STUDY.run, STUDY.config_from
