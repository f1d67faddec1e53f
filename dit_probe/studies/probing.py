"""The probing study (paper section 5.1, Fig. 7): does the object word's attention map carry the colour?

For each model: build the colour x object x seed dataset of colour-token and object-token maps
(``dit_probe.probing.dataset``), then at every recorded (layer, step), at every layer pooled over
steps, at every step pooled over layers, and pooled over both, train colour probes on colour-token
maps and measure them on held-out colour-token maps (does the probe work?) and on the object-token
maps of the same images (transfer, i.e. leakage, under three scalers: ``probes.TRANSFER``); and the
reverse direction (object probes on object-token maps, applied to colour-token maps).

Controls (docs/probing.md, "Controls"): a *direct* probe trained and tested on the other token's maps
(cross-validated by seed as above, and for the colour, by object too), and the *text-encoder
control*: the colour decoded from the object word's (and, as a ceiling, the colour word's) rows of
the encoded prompt, per text stream, before any attention. The encoded prompt is the same for every
seed, so that control holds out whole objects (folds: min(folds, objects)); so does the direct
probe it is compared with ("direct_by_object").

Output: ``probing.csv`` (one row per model, features, direction, layer, step, metric, class), three
figures and ``probing-controls.md``. One unit per model, run and cached by ``studies.runner``; inside
it the dataset's (object, seed) shards are kept in ``<out>/datasets/`` and resume on their own.

    dit-probe run probing --model toy-mmdit --model toy-unet
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from joblib import Parallel, delayed

from ..io import settings_hash
from ..probing import dataset as ds
from ..probing import plots
from ..probing.probes import ProbeSettings, check_design, direct_probe, probe
from ..registry import load_pipeline, model_identity, sampling_settings
from ..toyworld import TOY_MODELS, Judge
from .runner import Report, Study, StudyConfig, Unit

_TOY_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]
_TOY_OBJECTS = ["circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond"]
DIRECTIONS = {  # direction -> (token the probe is trained on, the other token, label)
    "color": ("color", "object", "colors"),
    "object": ("object", "color", "objects"),
}


class ProbingConfig(StudyConfig):
    """Defaults are the toy-world run (both toy models, 8 colours x 8 shapes x 8 seeds, on a CPU)."""

    colors: list[str] = list(_TOY_COLORS)
    objects: list[str] = list(_TOY_OBJECTS)
    template: str = "a {color} {object}"
    seeds: int = 8  # seeds per (colour, object); the same seeds for every colour and object
    first_seed: int = 0
    # sampling: None keeps the model's default (toy: 25 steps, CFG 5; real: the paper's 50 steps, CFG 7.5)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    size: int | None = None
    layers: list[str] | None = None  # canonical layer names or globs; None: every layer with text keys
    recorded_steps: list[int] | None = None  # None: every ``step_stride``-th step and the last
    step_stride: int = 3
    grid: list[int] | None = [8, 8]  # common map grid; None: largest, <= 32
    normalise: str = "sum"  # per map: 'sum' (a distribution over positions), 'zscore' or 'none'
    folds: int = 5
    C: float = 0.1  # inverse L2 strength of the logistic regressions
    ci: float = 0.95
    n_jobs: int = -1  # probe fits in parallel over (layer, step) units
    split_words: str = "sum"  # a word the tokenizer splits: 'sum' its pieces or 'refuse'
    store_dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # torch dtype of the weights, e.g. 'float16' on a GPU; None: as saved
    example_object: str | None = None  # the example-maps figure (default: the first object and seed)
    random_state: int = 0

    # the figures only: no unit depends on them (bootstrap is part of the probes' CIs, so it is kept)
    REPORT_ONLY = ("example_object", "n_jobs")

    def check(self) -> None:
        if not self.models:
            raise ds.ProbingInputError("give at least one model (--model NAME)")
        if self.seeds < 1:
            raise ds.ProbingInputError(f"seeds must be >= 1, got {self.seeds}")
        if self.step_stride < 1:
            raise ds.ProbingInputError(f"step_stride must be >= 1, got {self.step_stride}")
        if self.normalise not in ("sum", "zscore", "none"):
            raise ds.ProbingInputError(f"normalise must be 'sum', 'zscore' or 'none', got {self.normalise!r}")
        if self.example_object is not None and self.example_object not in self.objects:
            raise ds.ProbingInputError(f"example_object {self.example_object!r} is not one of the objects {self.objects}")
        ds.check_grid(self.grid_for(steps=None))
        # the probes check this too, but here it fails before the generation rather than after it
        if self.folds < 2:
            raise ds.ProbingInputError(f"cross-validation needs folds >= 2; got folds={self.folds}")
        if self.seeds < self.folds:
            raise ds.ProbingInputError(
                f"too few samples for {self.folds}-fold cross-validation grouped by seed: seeds={self.seeds}. "
                f"Use at least {self.folds} seeds, or lower folds (minimum 2)"
            )

    def grid_for(self, steps) -> ds.ProbeGrid:
        sampling = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                    "height": self.size, "width": self.size}
        return ds.ProbeGrid(
            colors=list(self.colors), objects=list(self.objects),
            seeds=list(range(self.first_seed, self.first_seed + self.seeds)), template=self.template,
            sampling={k: v for k, v in sampling.items() if v is not None}, layers=self.layers, steps=steps,
            grid=self.grid, split_words=self.split_words, store_dtype=self.store_dtype,
        )

    def probe_settings(self) -> ProbeSettings:
        return ProbeSettings(folds=self.folds, C=self.C, bootstrap=self.bootstrap, ci=self.ci, seed=self.random_state)


def _recorded_steps(cfg: ProbingConfig, pipe) -> list[int] | None:
    if cfg.recorded_steps is not None:
        return list(cfg.recorded_steps)
    if cfg.step_stride == 1:
        return None
    total = cfg.num_inference_steps or sampling_settings(pipe).get("num_inference_steps")
    if total is None:
        raise ds.ProbingInputError("this pipeline has no default step count: set num_inference_steps or steps")
    return sorted(set(range(0, total, cfg.step_stride)) | {total - 1})


def _folder_name(model: str) -> str:
    return Path(model).name if Path(model).is_dir() else model.replace("/", "-")


def _load(cfg: ProbingConfig, model: str):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    return load_pipeline(model, torch_dtype=dtype, device=device)


def _annotator(model: str):
    """The toy world's judge reads every generated image back (is the prompted colour there?)."""
    if model not in TOY_MODELS:
        return None
    judge = Judge()
    return lambda images: judge.read(images)


def probe_units(data: ds.ProbeDataset):
    """(layer, step) units: each recorded pair, each layer over all steps, each step over all layers, all."""
    units = [(lay, st) for lay in data.layers for st in data.steps]
    units += [(lay, None) for lay in data.layers] + [(None, st) for st in data.steps] + [(None, None)]
    return units


def by_object(settings: ProbeSettings, objects) -> ProbeSettings | None:
    """Settings for cross-validation that holds out whole objects (folds: at most one per object); None
    with fewer than 2 objects, where no object can be held out."""
    n = len(set(objects))
    return replace(settings, folds=min(settings.folds, n)) if n >= 2 else None


def _probe_unit(data, layer, step, normalise, settings):
    rows = []
    for direction, (own, other, label_attr) in DIRECTIONS.items():
        labels = getattr(data, label_attr)
        if len(set(labels)) < 2:
            continue  # one object: the reverse direction has nothing to classify
        X_own = data.features(own, layer, step, normalise)
        X_other = data.features(other, layer, step, normalise)
        found = [(r, "seed") for r in probe(X_own, X_other, labels, data.seeds, settings)]
        # direct: the label decoded from the other token's maps, trained and tested on them
        found += [(r, "seed") for r in direct_probe(X_other, labels, data.seeds, settings, name="direct")]
        held_out = by_object(settings, data.objects)
        if direction == "color" and held_out is not None:  # comparable with the text-encoder control
            found += [(r, "object") for r in direct_probe(X_other, labels, data.objects, held_out,
                                                           name="direct_by_object", group_name="object")]
        for r, groups in found:
            rows.append({"features": "maps", "direction": direction, "layer": layer or "mean",
                         "step": "mean" if step is None else step, "cv_groups": groups, **r})
    return rows


def text_controls(text: dict, settings: ProbeSettings) -> list[dict]:
    """The colour decoded from the text encoder's rows of the object word ("text_object") and of the
    colour word ("text_color", a ceiling), per stream; ``text`` as ``dataset.text_features`` returns.

    The rows do not depend on the seed, so the cross-validation holds out whole objects: a row never
    has a copy on the other side of a split, and the probe must find a colour code shared by objects
    it never saw. Fewer than 2 objects: no rows."""
    held_out = by_object(settings, text["objects"])
    if held_out is None:
        return []
    rows = []
    for token in ("object", "color"):
        for stream, X in text[token].items():
            for r in direct_probe(X, text["colors"], text["objects"], held_out, name=f"text_{token}",
                                  group_name="object"):
                rows.append({"features": f"text-encoder/{stream}", "direction": "color", "layer": "none",
                             "step": "none", "cv_groups": "object", **r})
    return rows


def probe_dataset(data: ds.ProbeDataset, cfg: ProbingConfig, log=print, text: dict | None = None) -> pd.DataFrame:
    """Every probe of one model's dataset; with ``text`` (``dataset.text_features``) the text-encoder control too."""
    settings = cfg.probe_settings()
    check_design(data.colors, data.seeds, settings.folds)
    units = probe_units(data)
    log(f"  probing {len(units)} (layer, step) units x {len(DIRECTIONS)} directions ({len(data)} images)")
    results = Parallel(n_jobs=cfg.n_jobs)(
        delayed(_probe_unit)(data, lay, st, cfg.normalise, settings) for lay, st in units
    )
    rows = [r for unit_rows in results for r in unit_rows]
    if text is not None:
        rows += text_controls(text, settings)
    frame = pd.DataFrame(rows)
    frame.insert(0, "model", data.meta["model"])
    frame.insert(1, "family", data.meta["family"])
    frame["n_images"], frame["n_seeds"] = len(data), len(set(data.seeds))
    frame["normalise"] = cfg.normalise
    frame["step"] = frame["step"].astype(str)
    return frame


def judged(data: ds.ProbeDataset) -> dict:
    """Share of images in which the judge reads the prompted colour / object (toy models only)."""
    notes = data.annotations
    if not notes or all(n is None for n in notes):
        return {}
    color = [bool(n) and n.get("color") == c for n, c in zip(notes, data.colors)]
    shape = [bool(n) and n.get("shape") == o for n, o in zip(notes, data.objects)]
    return {"judged_color_match": sum(color) / len(color), "judged_object_match": sum(shape) / len(shape)}


def _compute(ctx, unit: Unit, cfg: ProbingConfig):
    """The dataset (generated shard by shard, resumable) and every probe of one model."""
    pipe, out = ctx
    grid = cfg.grid_for(_recorded_steps(cfg, pipe))
    key = settings_hash({"model": model_identity(unit.model), "grid": grid.identity()})
    folder = out / "datasets" / f"{_folder_name(unit.model)}-{key}"
    t0 = time.time()
    data = ds.build(pipe, unit.model, grid, folder, annotate=_annotator(unit.model), log=lambda m: None)
    t1 = time.time()
    frame = probe_dataset(data, cfg, log=lambda m: None, text=ds.text_features(pipe, grid))
    frame["dataset"] = folder.relative_to(out).as_posix()
    extra = {**judged(data), "dataset_s": round(t1 - t0, 1), "probes_s": round(time.time() - t1, 1)}
    for k, v in extra.items():
        frame[k] = v
    return frame, None


def _report(cfg: ProbingConfig, results, out: Path) -> Report:
    table = pd.concat([r.frame for r in results], ignore_index=True)
    datasets = {r.unit.model: ds.ProbeDataset.load(out / r.frame.dataset.iloc[0]) for r in results}
    figures = plots.figures(table, datasets, example_object=cfg.example_object or cfg.objects[0],
                            example_seed=cfg.first_seed)
    figures["probing-controls.md"] = controls_table(table)
    text = "\n".join(summary_line(r.frame) for r in results)
    return Report(table, files={"probing.csv": table}, figures=figures, text=text)


STUDY = Study(
    name="probing", help="colour/object probes on attention maps (Fig. 7)", config=ProbingConfig,
    units=lambda cfg: [Unit(m) for m in cfg.models], prepare=lambda cfg, out: out,
    setup=lambda cfg, model, out: (_load(cfg, model), out),
    compute=_compute, report=_report,
    paper="Fig. 7: colour probes on colour- and object-word attention maps", toy_config="probing-toy.yaml",
    paper_config="probing-paper.yaml",
    figure_files=("probing-fig7.png", "probing-layers-steps.png", "probing-example-maps.png", "probing-controls.md"),
    read_csv={"dtype": {"step": str, "class": str}},
    revision=2,  # 2: transfer under three scalers, direct probes, text-encoder control
)
run, config_from = STUDY.run, STUDY.config_from


def pooled(table: pd.DataFrame, model: str, direction: str = "color", layer: str = "mean", step: str = "mean") -> dict:
    """The pooled (mean over layers and steps) metrics of one model as {metric: row}; or those of another unit."""
    sel = table[(table.model == model) & (table.direction == direction) & (table.layer == layer)
                & (table.step.astype(str) == str(step)) & (table["class"] == "all")]
    return {r.metric: r for r in sel.itertuples()}


def _fmt(r, digits=3) -> str:
    return f"{r.value:.{digits}f} [{r.ci_low:.{digits}f}, {r.ci_high:.{digits}f}]"


def text_rows(table: pd.DataFrame, model: str) -> dict:
    """The text-encoder control of one model (multiclass accuracy) as {(metric, stream): row}."""
    sel = table[(table.model == model) & table.features.astype(str).str.startswith("text-encoder/")
                & table.metric.isin(["text_object", "text_color"]) & (table["class"] == "all")]
    return {(r.metric, r.features.split("/", 1)[1]): r for r in sel.itertuples()}


def summary_line(frame: pd.DataFrame) -> str:
    model = frame.model.iloc[0]
    p = pooled(frame, model)

    def fmt(name):
        r = p[name]
        return f"{_fmt(r)} (shuffled {r.shuffled:.3f}, chance {r.chance:.3f})"

    lines = [f"  {model}, maps pooled over layers and steps:",
             f"    colour probe on colour-token maps (held-out seeds): {fmt('accuracy')}",
             f"    same probe on object-token maps (leakage):           {fmt('leakage')}",
             f"      the same, object maps with their own scaler:      {fmt('leakage_own_scaler')}",
             f"      the same, no scaler:                              {fmt('leakage_no_scaler')}",
             f"        (that probe on colour-token maps:               {fmt('accuracy_no_scaler')})",
             f"    one-vs-rest leakage, balanced accuracy:              {fmt('ovr_leakage_balanced')}",
             f"    direct colour probe on object-token maps:            {fmt('direct')}"]
    if "direct_by_object" in p:
        lines.append(f"      the same, objects held out:                       {fmt('direct_by_object')}")
    for (metric, stream), r in text_rows(frame, model).items():
        word = "object" if metric == "text_object" else "colour"
        lines.append(f"    text encoder, {word} word ({stream}), objects held out: "
                     f"{_fmt(r)} (shuffled {r.shuffled:.3f}, chance {r.chance:.3f})")
    r = pooled(frame, model, "object")
    if r:  # the reverse direction (needs two or more objects)
        p = r
        lines += [f"    object probe on object-token maps:                   {fmt('accuracy')}",
                  f"    same probe on colour-token maps (reverse leakage):   {fmt('leakage')}"]
    if "judged_color_match" in frame:
        lines.append(f"    judge: prompted colour in {frame.judged_color_match.iloc[0]:.1%} of images, "
                     f"prompted shape in {frame.judged_object_match.iloc[0]:.1%}")
    return "\n".join(lines)


# the controls table: (metric, what it measures), colour probes
CONTROLS = [
    ("accuracy", "colour probe on held-out colour-word maps (does the probe work?)"),
    ("direct", "**direct**: colour probe trained and tested on object-word maps"),
    ("direct_by_object", "direct, whole objects held out (compare with the text encoder)"),
    ("leakage", "transfer to object-word maps, scaler `source` (fitted on colour-word maps: the original leakage)"),
    ("leakage_own_scaler", "transfer, scaler `own` (object-word maps standardised with their own training fold)"),
    ("leakage_no_scaler", "transfer, no scaler"),
    ("accuracy_no_scaler", "no scaler: the same probe on held-out colour-word maps"),
]
TEXT_CONTROLS = {"text_object": "text encoder: object word", "text_color": "text encoder: colour word (ceiling)"}
_GROUPS = {"seed": "seeds", "object": "objects"}


def best_unit(table: pd.DataFrame, model: str) -> tuple[str, str, int]:
    """(layer, step, number of units compared): the unit, pooled over both layers and steps left out, whose
    direct colour probe on object-word maps is the most accurate (first on ties)."""
    sel = table[(table.model == model) & (table.direction == "color") & (table.metric == "direct")
                & (table["class"] == "all") & ~((table.layer == "mean") & (table.step.astype(str) == "mean"))]
    top = sel.loc[sel.value.idxmax()]
    return top.layer, str(top.step), len(sel)


def controls_table(table: pd.DataFrame) -> str:
    """Markdown: per model, every colour probe and control with its 95% CI, shuffled control and chance,
    maps pooled over layers and steps and at the best unit (see ``best_unit``)."""
    lines = ["# Probing controls: where the colour is decodable (colour probes)", "",
             "Accuracy of multiclass colour probes with its 95% bootstrap CI (resampling the groups that "
             "cross-validation holds out). How to read it: docs/probing.md, section \"Controls\". The text-encoder "
             "rows do not depend on a layer or step: the same number stands in both columns. The best unit is "
             "chosen on the same data it reports, so its numbers are optimistic.", ""]
    for model in dict.fromkeys(table.model):
        p = pooled(table, model)
        layer, step, n_units = best_unit(table, model)
        at = pooled(table, model, layer=layer, step=step)
        first = table[table.model == model].iloc[0]
        k = round(1 / p["accuracy"].chance)
        m = round(first.n_images / (k * first.n_seeds))
        if step == "mean":
            where = f"layer {layer}, pooled over steps"
        elif layer == "mean":
            where = f"step {step}, pooled over layers"
        else:
            where = f"layer {layer}, step {step}"
        lines += [f"## {model}", "",
                  f"{first.n_images} images ({k} colours x {m} objects x {first.n_seeds} seeds); chance 1/{k} = "
                  f"{1 / k:.3f}. Best unit: {where} (highest direct accuracy of {n_units} units).", "",
                  "| measure | CV holds out | maps pooled over layers and steps | best unit | shuffled labels (pooled) "
                  "| chance |",
                  "|---|---|---|---|---|---|"]
        rows = [(label, p.get(metric), at.get(metric)) for metric, label in CONTROLS]
        rows += [(f"{TEXT_CONTROLS[metric]}, {stream} stream", r, r) for (metric, stream), r in text_rows(table, model).items()]
        for label, r, b in rows:
            if r is None:  # direct_by_object with one object
                lines.append(f"| {label} | objects | n/a: needs 2 or more objects | | | {1 / k:.3f} |")
                continue
            lines.append(f"| {label} | {_GROUPS[r.cv_groups]} | {_fmt(r, 2)} | {_fmt(b, 2)} | {r.shuffled:.2f} | "
                         f"{r.chance:.3f} |")
        if not text_rows(table, model):
            lines.append(f"| text encoder | objects | n/a: needs 2 or more objects | | | {1 / k:.3f} |")
        lines.append("")
    return "\n".join(lines)
