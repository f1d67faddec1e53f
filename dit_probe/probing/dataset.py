"""The probing dataset: attention maps of a colour word and an object word over a colour x object x seed grid.

For every object and seed, one pipeline call generates the prompts "a {color} {object}" for all
colours with the *same* initial noise (one generator per image, all seeded alike), so the layout
of an image does not depend on its colour. The recorder keeps the conditional-branch maps of the
colour token and the object token at every recorded (layer, step), averaged over heads and resized
to a common grid. Sub-word pieces of a word are summed (``split_words="sum"``) or refused.

On disk (``folder``):
- ``dataset.json``: the settings, layers, steps, grid, timesteps, token pieces, package versions;
- ``shards/{object}__{seed}.safetensors``: ``maps`` (colour, token, step, layer, y, x) with token
  0 = colour word and 1 = object word, ``images`` (colour, y, x, rgb) uint8 (at most 64 px a side),
  and the prompts and annotations as metadata.
Every file is written atomically; a finished shard is never generated again.

``text_features`` gives, for the text-encoder control, the encoded prompt's rows at the colour and
object words (what the denoiser receives for them before any attention), one row per prompt.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..attention import record
from ..io import atomic_write, versions, write_json
from ..settings import sampling_settings

TOKENS = ("color", "object")  # token axis of the stored maps
IMAGE_SIDE = 64  # stored thumbnails are at most this many pixels a side


class ProbingInputError(ValueError):
    """The probing grid cannot be built as asked (a word missing from the prompt, too few colours, ...)."""


@dataclass
class ProbeGrid:
    """What to generate and record. Identity of a dataset: every field but ``objects`` and ``seeds``,
    which may grow between runs (new shards are added, finished ones kept)."""

    colors: list[str]
    objects: list[str]
    seeds: list[int]
    template: str = "a {color} {object}"
    sampling: dict = field(default_factory=dict)  # overrides of the model's defaults (steps, guidance, size)
    layers: list[str] | None = None  # canonical names or globs; None: every layer with text keys
    steps: list[int] | None = None  # recorded denoising steps; None: all
    grid: list[int] | None = None  # common (h, w) of the stored maps; None: the largest layer grid, at most 32
    split_words: str = "sum"  # a word the tokenizer splits: "sum" its pieces' maps, or "refuse"
    store_dtype: str = "float32"

    def identity(self) -> dict:
        d = asdict(self)
        d.pop("objects"), d.pop("seeds")
        return d

    def prompt(self, color: str, obj: str) -> str:
        return self.template.format(color=color, object=obj)


def check_grid(grid: ProbeGrid) -> None:
    """Errors that need no model: the colour and object lists and the template."""
    if len(grid.colors) < 2:
        raise ProbingInputError(
            f"a colour probe needs at least 2 colours; got {len(grid.colors)} ({grid.colors}). Give two or more colours"
        )
    if len(grid.objects) < 1:
        raise ProbingInputError("give at least one object word")
    for what, words in (("colours", grid.colors), ("objects", grid.objects), ("seeds", grid.seeds)):
        dup = sorted({str(w) for w in words if list(words).count(w) > 1})
        if dup:
            raise ProbingInputError(f"the {what} repeat {dup}: give each once")
    for what, words in (("colour", grid.colors), ("object", grid.objects)):
        for w in words:
            if not str(w).strip() or "__" in str(w) or "/" in str(w):
                raise ProbingInputError(f"{what} word {w!r} is empty or contains '/' or '__'")
    both = sorted(set(map(str.lower, grid.colors)) & set(map(str.lower, grid.objects)))
    if both:
        raise ProbingInputError(f"{both} are both colour and object words: the two tokens must differ")
    missing = [k for k in ("{color}", "{object}") if k not in grid.template]
    if missing:
        raise ProbingInputError(
            f"the template {grid.template!r} has no {' or '.join(missing)}: the colour and object words must be in "
            "the prompt, e.g. 'a {color} {object}'"
        )
    if grid.split_words not in ("sum", "refuse"):
        raise ProbingInputError(f"split_words must be 'sum' or 'refuse', got {grid.split_words!r}")
    if grid.store_dtype not in ("float32", "float16"):
        raise ProbingInputError(f"store_dtype must be 'float32' or 'float16', got {grid.store_dtype!r}")


def check_words(adapter, grid: ProbeGrid, text_len: int | None) -> dict:
    """Map every colour and object word to its tokens in every prompt, before anything is generated.

    Returns {word: {stream: [pieces]}}. Raises ProbingInputError for a word missing from its prompt
    (or truncated away), a colour and object word on the same tokens, or a split word with
    ``split_words="refuse"``.
    """
    pieces = {}
    for obj in grid.objects:
        for color in grid.colors:
            prompt = grid.prompt(color, obj)
            found = {}
            for role, word in (("colour", color), ("object", obj)):
                try:
                    found[role] = adapter.word_positions(prompt, word, text_len)
                except KeyError as err:
                    raise ProbingInputError(
                        f"the {role} word {word!r} is not in the prompt {prompt!r} as the model tokenizes it "
                        f"(template {grid.template!r}): {err.args[0]}"
                    ) from None
            for stream, pos in found["colour"].items():
                if set(pos) & set(found["object"].get(stream, [])):
                    raise ProbingInputError(
                        f"in {prompt!r} the colour word {color!r} and the object word {obj!r} share tokens in the "
                        f"{stream} stream: choose words that do not overlap"
                    )
            toks = adapter.tokens(prompt, text_len)
            for word, spans in ((color, found["colour"]), (obj, found["object"])):
                for stream, pos in spans.items():
                    offset = next(s.offset for s in adapter.streams(text_len) if s.name == stream)
                    pieces.setdefault(word, {})[stream] = [toks[stream][p - offset] for p in pos]
    split = {w: p for w, p in pieces.items() if any(len(v) > 1 for v in p.values())}
    if split and grid.split_words == "refuse":
        raise ProbingInputError(
            "the tokenizer splits these words into several tokens: "
            + "; ".join(f"{w!r} -> {p}" for w, p in split.items())
            + ". Use split_words='sum' to add the pieces' maps, or choose single-token words"
        )
    return pieces


def _shard_name(obj: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', obj)}__{seed}.safetensors"


def intact(path: Path, warn: bool = False) -> bool:
    """Whether ``path`` is a whole safetensors file: its header parses and the file is exactly as long as
    the header says (a truncated copy or an interrupted write fails). ``warn``: name a damaged file."""
    if not path.exists():
        return False
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        ok = path.stat().st_size == 8 + n + end
    except (ValueError, KeyError, TypeError, OSError):
        ok = False
    if not ok and warn:
        warnings.warn(f"{path} is damaged (truncated or not a safetensors file): generating it again", stacklevel=3)
    return ok


def _thumbnails(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) float in [0, 1] -> uint8, area-downsampled to at most IMAGE_SIDE a side."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    f = max(1, int(np.ceil(max(h, w) / IMAGE_SIDE)))
    if f > 1:
        x = torch.nn.functional.avg_pool2d(x, f)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build(pipe, model: str, grid: ProbeGrid, folder, annotate=None, log=print, on_shard=None) -> "ProbeDataset":
    """Generate and record every (object, seed) shard of ``grid`` that ``folder`` does not hold yet.

    pipe: a pipeline from ``load_pipeline`` (its default sampling settings apply, ``grid.sampling``
    overrides them). annotate: optional ``images uint8 (n, H, W, 3) -> list of dicts`` stored with the
    shard (the toy world's judge readings). on_shard: called with each new shard's path (progress;
    tests use it to interrupt a run).
    """
    check_grid(grid)
    folder = Path(folder)
    adapter = get_adapter(pipe)
    kwargs = {**sampling_settings(pipe), **grid.sampling}
    pieces = check_words(adapter, grid, None)  # the recorder checks again against the actual text length
    meta_path = folder / "dataset.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["grid_settings"] != json.loads(json.dumps(grid.identity())) or meta["model"] != model:
            raise ProbingInputError(
                f"{folder} holds a probing dataset built with other settings (model {meta['model']!r}, "
                f"{meta['grid_settings']}); give another output folder, or delete it to start again"
            )
    else:
        meta = {"model": model, "family": adapter.family, "grid_settings": grid.identity(), "sampling": kwargs,
                "pieces": pieces, "versions": versions()}
    todo = [(o, s) for o in grid.objects for s in grid.seeds if not intact(folder / "shards" / _shard_name(o, s), warn=True)]
    done = len(grid.objects) * len(grid.seeds) - len(todo)
    log(f"{model}: {done} of {len(grid.objects) * len(grid.seeds)} (object, seed) shards on disk, {len(todo)} to generate")
    dtype = getattr(torch, grid.store_dtype)
    for obj, seed in tqdm(todo, desc=f"{model} shards", leave=False, disable=None):
        prompts = [grid.prompt(c, obj) for c in grid.colors]
        generators = [torch.Generator().manual_seed(int(seed)) for _ in prompts]
        with record(pipe, words={"color": list(grid.colors), "object": [obj] * len(prompts)},
                    layers=grid.layers, steps=grid.steps) as maps:
            images = pipe(prompts, generator=generators, output_type="np", **kwargs).images
        if "layers" not in meta:  # first shard: fix the layers, steps and common grid for the whole dataset
            largest = max(maps.grids.values(), key=lambda g: g[0] * g[1])
            meta.update(layers=maps.layers, layer_kinds=maps.layer_kinds, native_grids=maps.grids, steps=maps.steps,
                        timesteps=maps.timesteps[0],
                        grid=list(grid.grid) if grid.grid else [min(largest[0], 32), min(largest[1], 32)])
            write_json(meta_path, meta)
        if maps.steps != meta["steps"] or maps.layers != meta["layers"]:
            raise RuntimeError(f"shard {obj}/{seed} recorded steps {maps.steps} and layers {maps.layers}, unlike the "
                               f"dataset's {meta['steps']} / {meta['layers']}")
        # (step, layer, branch, batch, head, token, y, x) -> (batch=colour, token, step, layer, y, x)
        t = torch.cat([maps.tensor(role, branch="cond", grid=tuple(meta["grid"])) for role in TOKENS], dim=5)
        t = rearrange(t[:, :, 0, :, 0], "step layer colour token y x -> colour token step layer y x").contiguous().to(dtype)
        thumbs = _thumbnails(images)
        # the annotator reads full-resolution images (toy images are stored whole anyway)
        notes = annotate((np.asarray(images) * 255).round().astype(np.uint8)) if annotate else None
        info = {"object": obj, "seed": str(seed), "colors": json.dumps(list(grid.colors)),
                "prompts": json.dumps(prompts), "annotations": json.dumps(notes)}
        tensors = {"maps": t, "images": torch.from_numpy(thumbs)}
        path = folder / "shards" / _shard_name(obj, seed)
        atomic_write(path, lambda tmp, tensors=tensors, info=info: save_file(tensors, tmp, metadata=info))
        if on_shard is not None:
            on_shard(path)
    if not meta_path.exists():
        write_json(meta_path, meta)
    return ProbeDataset.load(folder, objects=grid.objects, seeds=grid.seeds)


def text_features(pipe, grid: ProbeGrid) -> dict:
    """The text encoder's output at the colour and object words of every prompt "a {color} {object}".

    One row per (colour, object) prompt: a deterministic text encoder gives every seed the same rows.
    The rows are the adapter's ``encode_prompt`` output (the conditional embeddings the denoiser receives,
    with the generation's text length) at the word's positions in each text stream, averaged over the
    pieces of a word the tokenizer splits. Returns {"colors": (n,), "objects": (n,), "color": {stream:
    (n, d)}, "object": {stream: (n, d)}}; a stream that lacks a word in some prompt (truncated) is left out.
    """
    check_grid(grid)
    adapter = get_adapter(pipe)
    settings = {**sampling_settings(pipe), **grid.sampling}
    kwargs = {k: settings[k] for k in ("max_sequence_length",) if k in settings}  # the generation's text length
    colors, objects, rows = [], [], {"color": {}, "object": {}}
    for obj in grid.objects:  # one batch per object, as the generation
        prompts = [grid.prompt(c, obj) for c in grid.colors]
        with torch.no_grad():
            embeds = adapter.encode_prompt(prompts, do_cfg=False, **kwargs).embeds.float().cpu().numpy()
        for i, color in enumerate(grid.colors):
            for role, word in (("color", color), ("object", obj)):
                for stream, pos in adapter.word_positions(prompts[i], word, embeds.shape[1]).items():
                    rows[role].setdefault(stream, []).append(embeds[i, pos].mean(axis=0))
        colors += list(grid.colors)
        objects += [obj] * len(grid.colors)
    n = len(colors)
    feats = {role: {s: np.stack(r) for s, r in by_stream.items() if len(r) == n} for role, by_stream in rows.items()}
    return {"colors": np.asarray(colors), "objects": np.asarray(objects), **feats}


class ProbeDataset:
    """The stored grid, loaded: ``maps`` (n, token, step, layer, y, x) with labels per image."""

    def __init__(self, meta, maps, images, colors, objects, seeds, annotations):
        self.meta = meta
        self.maps, self.images = maps, images
        self.colors, self.objects, self.seeds = np.asarray(colors), np.asarray(objects), np.asarray(seeds)
        self.annotations = annotations
        self.layers: list[str] = meta["layers"]
        self.steps: list[int] = meta["steps"]

    def __len__(self):
        return len(self.colors)

    @classmethod
    def load(cls, folder, objects=None, seeds=None) -> "ProbeDataset":
        """Load the shards of ``folder`` (only the given objects / seeds if set)."""
        folder = Path(folder)
        if not (folder / "dataset.json").exists():
            raise FileNotFoundError(f"{folder} is not a probing dataset: it has no dataset.json")
        meta = json.loads((folder / "dataset.json").read_text())
        maps, images, colors, objs, seed_list, notes = [], [], [], [], [], []
        for path in sorted((folder / "shards").glob("*.safetensors")):
            if not intact(path):
                raise RuntimeError(f"{path} is damaged (truncated or not a safetensors file): delete it and run the "
                                   "study again to regenerate it")
            with safe_open(str(path), "pt") as f:
                info = f.metadata()
                if (objects is not None and info["object"] not in objects) or (
                        seeds is not None and int(info["seed"]) not in {int(s) for s in seeds}):
                    continue
                maps.append(f.get_tensor("maps").float())
                images.append(f.get_tensor("images"))
            cs = json.loads(info["colors"])
            colors += cs
            objs += [info["object"]] * len(cs)
            seed_list += [int(info["seed"])] * len(cs)
            notes += json.loads(info["annotations"]) or [None] * len(cs)
        if not maps:
            raise FileNotFoundError(f"{folder} holds no shards for the requested objects and seeds")
        return cls(meta, torch.cat(maps).numpy(), torch.cat(images).numpy(), colors, objs, seed_list, notes)

    def features(self, token: str, layer=None, step=None, normalise: str = "sum") -> np.ndarray:
        """(n, y*x) maps of ``token`` ('color' or 'object') at one layer and step.

        layer / step: a name / step index, or None for the mean over all of them (the pooled map).
        normalise: 'sum' divides each map by its sum (a distribution over positions: where the token
        attends, not how much), 'zscore' standardises each map, 'none' keeps joint-softmax probabilities.
        """
        if token not in TOKENS:
            raise KeyError(f"token must be one of {TOKENS}, got {token!r}")
        x = self.maps[:, TOKENS.index(token)]  # (n, step, layer, y, x)
        x = x[:, [self.steps.index(step)]] if step is not None else x
        x = x[:, :, [self.layers.index(layer)]] if layer is not None else x
        x = x.mean(axis=(1, 2)).reshape(len(x), -1).astype(np.float64)
        if normalise == "sum":
            x = x / np.maximum(x.sum(axis=1, keepdims=True), 1e-30)
        elif normalise == "zscore":
            x = (x - x.mean(axis=1, keepdims=True)) / np.maximum(x.std(axis=1, keepdims=True), 1e-30)
        elif normalise != "none":
            raise ValueError(f"normalise must be 'sum', 'zscore' or 'none', got {normalise!r}")
        return x
