"""A ZOPIE-style editing benchmark (paper section 4.1, Table 2): the dataset format, a toy-world
generator, and the runner.

**Format**: a folder with ``index.jsonl``, one edit per line::

    {"id": "color-star-0", "image": "images/color-star-0.png", "source_prompt": "a large red star on a white background",
     "edit_prompt": "a large blue star on a white background", "edit_phrase": "a blue shape",
     "edit_feature": "color", "object_class": "star", "roi": [x0, y0, x1, y1],
     "background_mask": "masks/color-star-0.png", "source_value": "red", "target_value": "blue"}

``image`` and ``background_mask`` are paths relative to the folder (the mask: white = background,
the region an edit must preserve). ``edit_phrase`` (the target phrase z_s), ``roi``, ``source_value``,
``target_value`` and ``target_image`` are optional; the values let the toy judge score the edit, and the
target image (the edit's true result, known in the toy world) gives the oracle mode ``text+reference``
and cos(n_zt, n_ref) for the distilled image directions.

**Runner**: every editing mode (eim, prompt-only, hsds-only, dds, sds) edits every image at several
alphas. Per edit: background PSNR, SSIM and LPIPS against the source inside the mask, at the report
alpha (default 1); CLIPScore of the edited image with the edit prompt (when a CLIP model is given);
the judge's target probability at each alpha, and from it the graded-edit score (the stand-in for
MLLM-VQA; ``dit_probe.metrics.graded``). Results: ``edits.csv``, ``table.csv`` and ``table.md`` in
Table 2's layout; one unit per (model, mode), run and cached by ``studies.runner``.

    dit-probe run benchmark --model toy-mmdit
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..io import settings_hash, write_text
from ..metrics import psnr, ssim
from ..metrics.clip import Clip, clip_score, edit_probability
from ..metrics.graded import graded_steps
from ..metrics.lpips import LPIPS
from ..stats import mean_ci
from ..toyworld import ATTRIBUTES, SHAPES, Judge, render
from ..toyworld.world import coverage, random_scene
from .levels import LEVEL_AXES, LEVEL_COLUMNS, apply_level, plot_against_log_snr, with_level
from .runner import Report, Study, Unit
from .sources import EDITABLE, REFERENCE_MODES, EditorSettings, background_mask, check_modes, phrase_for

REQUIRED = ("id", "image", "source_prompt", "edit_prompt", "edit_feature", "object_class", "background_mask")
OPTIONAL = ("edit_phrase", "roi", "source_value", "target_value", "target_image")


class BenchmarkFormatError(ValueError):
    """A benchmark folder that does not follow the format."""


@dataclass
class BenchmarkItem:
    id: str
    image: np.ndarray  # (H, W, 3) uint8
    source_prompt: str
    edit_prompt: str
    edit_feature: str
    object_class: str
    background_mask: np.ndarray  # (H, W) bool, True = background (preserve)
    edit_phrase: str | None = None
    roi: list | None = None
    source_value: str | None = None
    target_value: str | None = None
    target_image: np.ndarray | None = None  # (H, W, 3) uint8: the true edited image, where known


def read_benchmark(folder) -> list[BenchmarkItem]:
    """Every edit of a benchmark folder, with images and masks loaded and checked."""
    folder = Path(folder)
    index = folder / "index.jsonl"
    if not index.exists():
        raise BenchmarkFormatError(f"{folder} has no index.jsonl: a benchmark folder holds index.jsonl (one JSON "
                                   f"object per edit with keys {', '.join(REQUIRED)}) and the images and masks it names")
    items = []
    for k, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(f"{index} line {k} is not JSON ({e.msg})") from None
        missing = [key for key in REQUIRED if key not in rec]
        if missing:
            raise BenchmarkFormatError(f"{index} line {k} lacks {missing}; every edit needs {', '.join(REQUIRED)}")
        unknown = sorted(set(rec) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise BenchmarkFormatError(f"{index} line {k} has unknown keys {unknown}; optional keys: {', '.join(OPTIONAL)}")
        paths = {key: folder / rec[key] for key in ("image", "background_mask", "target_image") if key in rec}
        for key, path in paths.items():
            if not path.exists():
                raise BenchmarkFormatError(f"{index} line {k}: {key} {rec[key]!r} does not exist in {folder}")
        image = np.asarray(Image.open(paths["image"]).convert("RGB"))
        mask = np.asarray(Image.open(paths["background_mask"]).convert("L")) > 127
        if mask.shape != image.shape[:2]:
            raise BenchmarkFormatError(f"{index} line {k}: the mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                                       f"{image.shape[1]}x{image.shape[0]}")
        target = np.asarray(Image.open(paths["target_image"]).convert("RGB")) if "target_image" in rec else None
        if target is not None and target.shape != image.shape:
            raise BenchmarkFormatError(f"{index} line {k}: the target image is {target.shape[1]}x{target.shape[0]} but "
                                       f"the image {image.shape[1]}x{image.shape[0]}")
        items.append(BenchmarkItem(**{**rec, "image": image, "background_mask": mask, "target_image": target}))
    if not items:
        raise BenchmarkFormatError(f"{index} lists no edits")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise BenchmarkFormatError(f"{index} repeats ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return items


def write_benchmark(folder, items: list[BenchmarkItem]) -> Path:
    """Write items in the format (PNG images and masks, index.jsonl last and atomically)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for it in items:
        Image.fromarray(it.image).save(folder / "images" / f"{it.id}.png")
        Image.fromarray((it.background_mask * 255).astype(np.uint8)).save(folder / "masks" / f"{it.id}.png")
        rec = {k: v for k, v in asdict(it).items() if v is not None and k not in ("image", "background_mask", "target_image")}
        rec.update(image=f"images/{it.id}.png", background_mask=f"masks/{it.id}.png")
        if it.target_image is not None:
            (folder / "targets").mkdir(exist_ok=True)
            Image.fromarray(it.target_image).save(folder / "targets" / f"{it.id}.png")
            rec["target_image"] = f"targets/{it.id}.png"
        lines.append(json.dumps(rec))
    return write_text(folder / "index.jsonl", "\n".join(lines) + "\n")


def toy_benchmark(per_class: int = 2, seed: int = 0, features=EDITABLE) -> list[BenchmarkItem]:
    """Toy-world edits in the format: for every edit feature and object class (shape), ``per_class`` random
    scenes with that feature changed to a random other value; exact background masks and ROIs."""
    rng = random.Random(seed)
    items = []
    for feature in features:
        for shape in SHAPES:
            for k in range(per_class):
                s = random_scene(rng, shape=shape)
                value = rng.choice([v for v in ATTRIBUTES[feature] if v != getattr(s, feature)])
                t = type(s)(**{**s.to_dict(), feature: value})
                ys, xs = np.nonzero((coverage(s) > 0) | (coverage(t) > 0))
                items.append(BenchmarkItem(
                    id=f"{feature}-{shape}-{k}", image=render(s), source_prompt=s.caption(), edit_prompt=t.caption(),
                    edit_feature=feature, object_class=shape, background_mask=background_mask(s, t),
                    edit_phrase=phrase_for(t, feature), roi=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    source_value=getattr(s, feature), target_value=value, target_image=render(t)))
    return items


class BenchmarkConfig(EditorSettings):
    data: str | None = None  # a benchmark folder; None: the toy benchmark, generated into <out>/data-<hash>
    per_class: int = 2  # toy benchmark: edits per (feature, object class)
    modes: list[str] = ["prompt-only", "eim", "hsds-only", "dds", "sds", "text+reference"]
    alphas: list[float] = [0.0, 0.5, 1.0, 1.5]
    report_alpha: float = 1.0  # background and CLIP metrics are read at this alpha
    seed: int = 0
    judge: str = "toy"  # toy (needs target_value) | clip
    clip: str | None = None  # CLIP model for CLIPScore and the clip judge (hub id or folder)
    lpips: str | None = None  # AlexNet weights for LPIPS: a file, or "torchvision"; None: no LPIPS column
    graded_delta: float = 0.02
    chunk: int = 16  # edits per editor call

    def check(self):
        super().check()
        check_modes(self.modes, references=True)  # reference modes: every item needs a target_image (checked)
        if float(self.report_alpha) not in [float(a) for a in self.alphas]:
            raise ValueError(f"report_alpha {self.report_alpha} must be one of the alphas {self.alphas}")
        if len(self.alphas) < 2:
            raise ValueError("the graded-edit score needs at least two alphas")
        if self.judge not in ("toy", "clip"):
            raise ValueError(f"judge must be 'toy' or 'clip', got {self.judge!r}")
        if self.judge == "clip" and not self.clip:
            raise ValueError("judge 'clip' needs clip: a CLIP model (hub id or local folder)")


def _judge_scores(cfg, items, images, clip):
    """(edits, alphas) probability of the target for every edited image."""
    n, a = images.shape[:2]
    flat = images.reshape(n * a, *images.shape[2:])
    if cfg.judge == "toy":
        scores = Judge().scores(flat)
        out = np.empty((n, a))
        for i, it in enumerate(items):
            if it.edit_feature not in ATTRIBUTES or it.target_value not in ATTRIBUTES.get(it.edit_feature, ()):
                raise BenchmarkFormatError(f"edit {it.id}: the toy judge needs edit_feature in {list(ATTRIBUTES)} and "
                                           f"a target_value it knows; got {it.edit_feature!r} / {it.target_value!r}. "
                                           "Use judge: clip for real images")
            col = ATTRIBUTES[it.edit_feature].index(it.target_value)
            out[i] = scores[it.edit_feature][i * a:(i + 1) * a, col]
        return out
    src = [it.source_prompt for it in items for _ in range(a)]
    tgt = [it.edit_prompt for it in items for _ in range(a)]
    return edit_probability(clip, flat, src, tgt).reshape(n, a)


def run_unit(editor, items, mode, cfg, clip=None, lpips=None) -> pd.DataFrame:
    alphas = [float(a) for a in cfg.alphas]
    k = alphas.index(float(cfg.report_alpha))
    rows = []
    for lo in range(0, len(items), cfg.chunk):
        part = items[lo:lo + cfg.chunk]
        sources = np.stack([_at_size(it.image, editor.size) for it in part])  # the model's size, as the editor would
        seeds = [cfg.seed * 100_000 + lo + i for i in range(len(part))]
        enc = editor.encode(sources, [it.source_prompt for it in part], seeds)
        phrases = [it.edit_phrase for it in part] if all(it.edit_phrase for it in part) else None
        targets = (np.stack([_at_size(it.target_image, editor.size) for it in part])
                   if all(it.target_image is not None for it in part) else None)
        if targets is None and mode in REFERENCE_MODES:
            raise BenchmarkFormatError(f"mode {mode!r} needs a target_image for every edit; this benchmark has none")
        direction = editor.identify(enc, [it.edit_prompt for it in part], mode, phrases, reference=targets, alphas=alphas)
        n_image = direction.image_at(1.0)
        cos = (torch.nn.functional.cosine_similarity(n_image.flatten(1).double(), editor.reference_direction(
            enc, targets).flatten(1).double(), dim=1).cpu().numpy() if n_image is not None and targets is not None
            else np.full(len(part), np.nan))
        images = editor.manipulate(enc, direction, alphas)
        scores = _judge_scores(cfg, part, images, clip)
        steps = graded_steps(scores, alphas, cfg.graded_delta)
        for i, it in enumerate(part):
            src, out = _at_size(it.image, images.shape[2]), images[i, k]
            mask = _at_size(it.background_mask, images.shape[2])
            row = {"id": it.id, "edit_feature": it.edit_feature, "object_class": it.object_class,
                   "psnr": float(psnr(src, out, mask)), "ssim": float(ssim(src, out, mask)),
                   "lpips": float(lpips.distance(src, out, mask)) if lpips is not None else np.nan,
                   "clip_score": float(clip_score(clip, out[None], it.edit_prompt)[0]) if clip is not None else np.nan,
                   "judge_target": float(scores[i, k]), "judge_start": float(scores[i, alphas.index(min(alphas))]),
                   "graded": float(steps[i].mean()), "cos_ref": float(cos[i])}
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.insert(0, "mode", mode)
    return frame


def _at_size(array, size):
    """An image or mask resized to the model's (square) size: the editor works there (nearest for masks)."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    if array.dtype == bool:
        return np.asarray(Image.fromarray(array.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC))


def summarise(edits: pd.DataFrame, n_boot: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    out = []
    for (model, level, mode), g in edits.groupby(["model", "level", "mode"], sort=False):
        row = {"model": model, "mode": mode, **g.iloc[0][LEVEL_COLUMNS].to_dict(), "edits": len(g)}
        for m in ("psnr", "lpips", "ssim", "clip_score", "judge_target", "graded", "cos_ref"):
            row[m], row[m + "_lo"], row[m + "_hi"] = mean_ci(g[m].astype(float), n_boot, rng)
        out.append(row)
    return pd.DataFrame(out)


def markdown_table(table: pd.DataFrame, cfg: BenchmarkConfig) -> str:
    """Table 2's layout: background PSNR ↑, LPIPS ×10³ ↓, SSIM ×10² ↑, CLIPScore ↑, and the judge columns."""
    def cell(r, m, scale=1.0, fmt="{:.1f}"):
        v = r[m]
        return "–" if not np.isfinite(v) else (fmt.format(v * scale) + f" [{fmt.format(r[m + '_lo'] * scale)}, "
                                                 f"{fmt.format(r[m + '_hi'] * scale)}]")

    judge = "toy judge" if cfg.judge == "toy" else "CLIP"
    lines = [f"| method | log-SNR | model | PSNR ↑ | LPIPS ×10³ ↓ | SSIM ×10² ↑ | CLIPScore ↑ | P(target) ×10² ({judge}) ↑ | "
             f"graded-edit ×10² ({judge}) ↑ | cos(n_zt, n_ref) |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(dict.fromkeys(table["mode"]))}
    for r in table.sort_values(["mode", "log_snr", "model"], key=lambda c: c.map(order) if c.name == "mode" else c
                               ).to_dict("records"):
        star = " *" if r["paper_start"] else ""
        lines.append(f"| {r['mode']} | {r['log_snr']:.2f}{star} | {r['model']} | {cell(r, 'psnr')} | {cell(r, 'lpips', 1000, '{:.0f}')} | "
                     f"{cell(r, 'ssim', 100)} | {cell(r, 'clip_score')} | {cell(r, 'judge_target', 100, '{:.0f}')} | "
                     f"{cell(r, 'graded', 100, '{:.0f}')} | {cell(r, 'cos_ref', 1, '{:+.2f}')} |")
    notes = [f"Background metrics and CLIPScore at alpha = {cfg.report_alpha:g}, inside the background mask; "
             f"graded-edit: share of consecutive alphas {cfg.alphas} where P(target) rises by more than "
             f"{cfg.graded_delta:g}; cos(n_zt, n_ref): the image direction against the true one (the target image "
             "noised alike), for the distilled directions; log-SNR: where the edit starts on that model's schedule "
             "(* = the paper's strength 0.75 starts there); 95% bootstrap CIs over edits."]
    if cfg.lpips is None:
        notes.append("LPIPS: not computed (no AlexNet weights given; set lpips: PATH or 'torchvision').")
    if cfg.clip is None:
        notes.append("CLIPScore: not computed (no CLIP model given; set clip: a hub id or folder).")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def _prepare(cfg: BenchmarkConfig, out: Path):
    # the generated toy benchmark is keyed by what makes it, so another seed never reuses old edits
    data = Path(cfg.data) if cfg.data else out / f"data-{settings_hash({'per_class': cfg.per_class, 'seed': cfg.seed})}"
    if not cfg.data and not (data / "index.jsonl").exists():
        write_benchmark(data, toy_benchmark(cfg.per_class, cfg.seed))
    return {"items": read_benchmark(data), "clip": Clip(cfg.clip) if cfg.clip else None,
            "lpips": LPIPS(cfg.lpips) if cfg.lpips else None}


def _report(cfg: BenchmarkConfig, results, out) -> Report:
    edits = pd.concat([r.frame for r in results], ignore_index=True)
    table = summarise(edits, cfg.bootstrap)
    md = markdown_table(table, cfg)
    fig = plot_against_log_snr(table.assign(all="all edits"), "judge_target", "all", "mode", "judge P(target) at "
                               f"alpha {cfg.report_alpha:g}")
    return Report(table, files={"edits.csv": edits, "table.csv": table, "table.md": md},
                  figures={"benchmark-table2.md": md, "benchmark-table2.csv": table, "benchmark-levels.png": fig}, text=md)


def _compute(ctx, unit: Unit, cfg: BenchmarkConfig):
    editor, shared = ctx
    level = apply_level(editor, unit["level"])
    return with_level(run_unit(editor, shared["items"], unit["mode"], cfg, shared["clip"], shared["lpips"]), level), None


STUDY = Study(
    name="benchmark",
    help="ZOPIE-style editing benchmark: background PSNR/SSIM/LPIPS, CLIPScore, graded-edit (Table 2)",
    config=BenchmarkConfig,
    units=lambda cfg: [Unit(m, (("mode", mode), ("level", lv))) for m in cfg.models for mode in cfg.modes
                       for lv in cfg.levels()],
    prepare=_prepare, setup=lambda cfg, model, shared: (cfg.editor(model), shared), compute=_compute,
    report=_report, axes=("models", "modes", *LEVEL_AXES),
    paper="Table 2: background PSNR/SSIM, judge P(target), graded-edit score", toy_config="benchmark-toy.yaml",
    revision=3,  # 2: the HSDS restraint pulls towards z_t under every sign (issue 15); 3: noise levels
    paper_config="benchmark-paper.yaml", figure_files=("benchmark-table2.md", "benchmark-table2.csv", "benchmark-levels.png"),
    summary_line=lambda f: (f"PSNR {f.psnr.mean():.1f}  SSIM {f.ssim.mean():.3f}  P(target) {f.judge_target.mean():.2f}"
                            f"  graded {f.graded.mean():.0%}"),
)
run, config_from = STUDY.run, STUDY.config_from
