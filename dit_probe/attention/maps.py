"""AttentionMaps: recorded image->text attention with named axes.

Axes of every tensor this class returns, in this order:
    step, layer, branch, batch, head, token, y, x
- step: recorded denoising steps (``maps.steps``; -1 when recorded as a mean over steps);
- layer: canonical layer names (``maps.layers``);
- branch: CFG branch ('cond', 'uncond');
- batch: generated images, over all generations recorded in the context (``maps.prompts``);
- head: attention heads, or one (the mean) when recorded with heads='mean';
- token: the selected words / token indices (``maps.tokens``: label and text stream);
- y, x: the image-token grid (UNet layers of lower resolution are resized when stacked).

Values are probabilities of the joint softmax: for DiTs a row summed over all text keys is < 1
(the rest goes to image keys). ``normalise='text'`` divides by that text mass, giving the share
of the query's text attention that goes to the token.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

AXES = ("step", "layer", "branch", "batch", "head", "token", "y", "x")
FORMAT_VERSION = 1


class MapsFileError(ValueError):
    """A saved AttentionMaps folder that cannot be read (the message names the file and what to do)."""


class AttentionMaps:
    def __init__(self, family, layers, layer_kinds, branches, heads_mode):
        self.family = family
        self.layers: list[str] = list(layers)
        self.layer_kinds: dict[str, str] = dict(layer_kinds)
        self.branches: list[str] = list(branches)
        self.heads_mode = heads_mode
        self.tokens: list[dict] = []  # {"label", "stream"}
        self.prompts: list[str | None] = []  # one per batch item
        self.timesteps: list[dict] = []  # per generation: step -> timestep
        self.grids: dict[str, tuple[int, int]] = {}
        # layer -> {path: attention calls}: how its probabilities were computed. 'kernel': the row
        # log-sum-exp came from the attention kernel itself; 'chunked': computed in query chunks (masks,
        # autograd, kernels that do not return it); 'naive': the full softmax (method='naive')
        self.paths: dict[str, dict[str, int]] = {}
        # "queries->keys". image->text: each word's map over the image (the default); text->image: where a
        # word's tokens, as queries, look in the image; image->image: a query set's map over the image;
        # text->text: a word's attention over the text positions (y, x) = (1, text length)
        self.relation = "image->text"
        self.settings: dict = {}  # how it was recorded (the recorder's options, dit_probe version): provenance
        self.images = None  # the generated images, when saved with the maps (list of (H, W, 3) uint8 arrays)
        self._chunks: list[dict] = []  # per generation: {"batch", "steps": {layer: {step: (data, mass)}}}
        self._data: dict[str, torch.Tensor] | None = None
        self._mass: dict[str, torch.Tensor | None] | None = None

    @classmethod
    def empty(cls, family, sites, branches, heads_mode):
        return cls(family, [s.name for s in sites], {s.name: s.kind for s in sites}, branches, heads_mode)

    # ----- filled by the recorder -----
    def _add_generation(self, g, adapter) -> None:
        base_h, base_w = g.grid
        per_layer: dict[str, dict[int, tuple]] = {}
        for (layer, step), (data, mass) in g.final.items():  # means, already in the storage dtype
            n = data.shape[-1]
            per_layer.setdefault(layer, {})[step] = (data, mass)
            if layer not in self.grids:  # the layer's real grid (UNet levels), else the denoiser's token grid
                h, w = g.layer_grids.get(layer, (base_h, base_w))
                if h * w != n:
                    raise RuntimeError(f"layer {layer}: {n} image tokens do not fill its {h}x{w} grid; the "
                                       f"{adapter.family} adapter reads the wrong spatial shape (a bug: please report)")
                self.grids[layer] = (h, w)
        self._chunks.append({"batch": g.batch, "layers": per_layer})
        prompts = g.prompts or [None]
        n_per = max(1, g.batch // len(prompts))
        self.prompts += [prompts[min(i // n_per, len(prompts) - 1)] for i in range(g.batch)]
        self.timesteps.append({int(k): float(v) for k, v in g.timesteps.items()})
        self._data = None

    def _build(self):
        if self._data is not None:
            return
        if not self._chunks:
            calls = getattr(self, "_denoiser_calls", None)
            if not calls:
                raise ValueError("no attention was recorded: the pipeline made no denoiser call inside the "
                                 "`with record(...)` block. Call it inside the block, with num_inference_steps >= 1")
            raise ValueError(f"no attention was recorded: the denoiser ran {calls} time(s), but never at a selected "
                             f"step ({self.settings.get('steps') or 'all'}) with a selected branch ({self.branches}); "
                             "e.g. branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
        steps = sorted({s for c in self._chunks for lay in c["layers"].values() for s in lay})
        self._steps = steps
        self._data, self._mass = {}, {}
        for layer in self.layers:
            parts, mparts = [], []
            # (head, token, n) of this layer, from any generation that recorded it
            example = next(d for c in self._chunks for d in c["layers"].get(layer, {}).values())
            for c in self._chunks:
                lay = c["layers"].get(layer, {})
                shape = (len(self.branches), c["batch"]) + tuple(example[0].shape[2:])
                nan = torch.full(shape, float("nan"), dtype=example[0].dtype)
                parts.append(torch.stack([lay[s][0] if s in lay else nan for s in steps]))
                if example[1] is not None:
                    mnan = torch.full(shape[:3] + shape[-1:], float("nan"), dtype=example[0].dtype)
                    mparts.append(torch.stack([lay[s][1] if s in lay and lay[s][1] is not None else mnan for s in steps]))
            self._data[layer] = torch.cat(parts, dim=2)  # (step, branch, batch, head, token, n)
            self._mass[layer] = torch.cat(mparts, dim=2) if mparts else None

    # ----- what was recorded -----
    @property
    def steps(self) -> list[int]:
        self._build()
        return list(self._steps)

    @property
    def words(self) -> list[str]:
        return list(dict.fromkeys(t["label"] for t in self.tokens))

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def __repr__(self):
        if not self._chunks:
            return f"AttentionMaps({self.family}, empty)"
        return (
            f"AttentionMaps({self.family}: {len(self.layers)} layers, steps {self.steps}, "
            f"branches {self.branches}, batch {self.batch_size}, heads {self.heads_mode}, "
            f"tokens {[t['label'] + '@' + t['stream'] for t in self.tokens]})"
        )

    # ----- selection -----
    def _token_matrix(self, word, stream):
        """(selected, recorded) 0/1 matrix: summing recorded entries into the selected tokens."""
        if word is None:
            return torch.eye(len(self.tokens)), [f"{t['label']}@{t['stream']}" for t in self.tokens]
        words = [word] if isinstance(word, (str, int)) else list(word)
        rows, labels = [], []
        for w in words:
            label = f"#{w}" if isinstance(w, int) else w
            hit = [i for i, t in enumerate(self.tokens) if t["label"] == label and (stream is None or t["stream"] == stream)]
            if not hit:
                raise KeyError(
                    f"{label!r}{'' if stream is None else ' in stream ' + repr(stream)} was not recorded; recorded: "
                    + ", ".join(f"{t['label']}@{t['stream']}" for t in self.tokens)
                )
            row = torch.zeros(len(self.tokens))
            row[hit] = 1.0
            rows.append(row)
            labels.append(label)
        return torch.stack(rows), labels

    def _layer_list(self, layer):
        if layer is None:
            return list(self.layers)
        sel = [layer] if isinstance(layer, (str, int)) else list(layer)
        out = []
        for s in sel:
            hits = [self.layers[s]] if isinstance(s, int) else [n for n in self.layers if fnmatch.fnmatchcase(n, s)]
            if not hits:
                raise KeyError(f"layer {s!r} was not recorded; recorded layers: {', '.join(self.layers)}")
            out += [h for h in hits if h not in out]
        return out

    def _step_index(self, step):
        steps = self.steps
        if step is None:
            return list(range(len(steps)))
        sel = [step] if isinstance(step, int) else list(step)
        idx = []
        for s in sel:
            if s not in steps:
                raise IndexError(f"step {s} was not recorded; recorded steps: {steps}")
            idx.append(steps.index(s))
        return idx

    def tensor(self, word=None, layer=None, step=None, branch=None, stream=None, normalise=None, grid=None):
        """The maps as a tensor with axes (step, layer, branch, batch, head, token, y, x).

        word: a label or list of labels (int for recorded token indices); its text streams are summed
        unless ``stream`` picks one. layer: names, globs or indices. step: recorded step(s).
        branch: 'cond' / 'uncond' or None for all recorded. normalise='text': divide by the
        query's total attention to text. grid: (h, w) to resize to (default: the largest grid; bilinear, antialiased).
        """
        self._build()
        if normalise not in (None, "text"):
            raise ValueError(f"normalise must be None or 'text', got {normalise!r}")
        if normalise == "text" and self.relation != "image->text":
            raise ValueError(f"normalise='text' divides image->text maps by each query's text mass; these are {self.relation}")
        tmat, _ = self._token_matrix(word, stream)
        layers = self._layer_list(layer)
        sidx = self._step_index(step)
        if branch is None:
            bidx = list(range(len(self.branches)))
        elif branch in self.branches:
            bidx = [self.branches.index(branch)]
        else:
            raise KeyError(f"branch {branch!r} was not recorded; recorded: {self.branches}")
        grid = grid or max((self.grids[n] for n in layers), key=lambda g: g[0] * g[1])
        out = []
        for name in layers:
            # (step, branch, batch, head, token, n); computed on in float32 whatever the storage dtype
            d = self._data[name][sidx][:, bidx].float()
            if normalise == "text":
                m = self._mass[name]
                if m is None:
                    raise ValueError("the text mass was not recorded (record(..., text_mass=True))")
                d = d / m[sidx][:, bidx].float().unsqueeze(-2)
            d = torch.einsum("sbnhtp,kt->sbnhkp", d, tmat)
            h, w = self.grids[name]
            d = d.reshape(*d.shape[:-1], h, w)
            if (h, w) != tuple(grid):
                lead = d.shape[:-2]
                # antialias: a downsampled map is an area average, not a sparse sample (no effect upsampling)
                d = F.interpolate(d.reshape(-1, 1, h, w), size=tuple(grid), mode="bilinear", align_corners=False,
                                  antialias=True)
                d = d.reshape(*lead, *grid)
            out.append(d)
        if len({d.shape[3] for d in out}) > 1:
            raise ValueError(
                "these layers have different numbers of heads, so they cannot be stacked with heads kept: "
                "select one layer at a time (layer=...) or record with heads='mean'"
            )
        return torch.stack(out, dim=1)

    def word_map(self, word, layer=None, step=None, batch: int = 0, branch="cond", stream=None, normalise=None):
        """One (y, x) map of ``word`` for one image: mean over the selected layers, steps and heads."""
        t = self.tensor(word, layer, step, branch, stream, normalise)
        if not 0 <= batch < t.shape[3]:
            raise IndexError(f"batch {batch} out of range: {t.shape[3]} images were recorded")
        return t[:, :, 0, batch, :, 0].nanmean(dim=(0, 1, 2))

    # ----- save / load -----
    def save(self, path, images=None) -> Path:
        """Write ``path/maps.safetensors`` (tensors) and ``path/maps.json`` (metadata), atomically; and
        the generated ``images`` (a (B, 3, H, W) tensor in [0, 1], or PIL images / arrays) as
        ``path/images/<i>.png``, so pictures can be drawn over them later (``dit-probe maps``)."""
        self._build()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if images is not None:
            self.images = _as_uint8_images(images)
            (path / "images").mkdir(exist_ok=True)
            for i, im in enumerate(self.images):
                tmp = path / "images" / f"{i}.tmp.png"
                Image.fromarray(im).save(tmp)
                os.replace(tmp, path / "images" / f"{i}.png")
        tensors = {f"maps::{k}": v.contiguous() for k, v in self._data.items()}
        tensors.update({f"mass::{k}": v.contiguous() for k, v in self._mass.items() if v is not None})
        meta = {
            "format": FORMAT_VERSION,
            "axes": ["step", "branch", "batch", "head", "token", "n"],
            "family": self.family,
            "layers": self.layers,
            "layer_kinds": self.layer_kinds,
            "branches": self.branches,
            "heads": self.heads_mode,
            "tokens": self.tokens,
            "prompts": self.prompts,
            "timesteps": self.timesteps,
            "steps": self._steps,
            "grids": {k: list(v) for k, v in self.grids.items()},
            "paths": self.paths,
            "relation": self.relation,
            "settings": self.settings,
        }
        tmp = path / "maps.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, path / "maps.safetensors")
        tmp = path / "maps.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / "maps.json")
        return path

    @classmethod
    def load(cls, path) -> "AttentionMaps":
        path = Path(path)
        files = [path / "maps.json", path / "maps.safetensors"]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"not a saved AttentionMaps folder: missing {', '.join(missing)}")
        redo = "it is damaged (an interrupted copy or save?): record and save it again"
        try:
            meta = json.loads(files[0].read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MapsFileError(f"{files[0]} is not valid JSON ({err}); {redo}") from None
        try:
            tensors = load_file(str(files[1]))
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a bad file
            raise MapsFileError(f"{files[1]} cannot be read ({err}); {redo}") from None
        try:
            m = cls(meta["family"], meta["layers"], meta["layer_kinds"], meta["branches"], meta["heads"])
            m.tokens, m.prompts, m.timesteps = meta["tokens"], meta["prompts"], meta["timesteps"]
            m.grids = {k: tuple(v) for k, v in meta["grids"].items()}
            m._steps = meta["steps"]
            m.paths = meta.get("paths", {})  # absent in folders saved before it was kept
            m.relation = meta.get("relation", "image->text")
            m.settings = meta.get("settings", {})
            m._data = {k: tensors[f"maps::{k}"] for k in m.layers}
            m._mass = {k: tensors.get(f"mass::{k}") for k in m.layers}
        except (KeyError, TypeError, AttributeError) as err:
            raise MapsFileError(f"{path} does not hold a complete AttentionMaps (missing {err}); {redo}") from None
        m._chunks = [None]  # loaded: built already
        shots = sorted((path / "images").glob("[0-9]*.png"), key=lambda f: int(f.stem)) if (path / "images").is_dir() else []
        if shots:
            m.images = [np.asarray(Image.open(f).convert("RGB")) for f in shots]
        return m


def _as_uint8_images(images) -> list[np.ndarray]:
    """(H, W, 3) uint8 arrays from a (B, 3, H, W) float tensor in [0, 1], or a list of PIL images / arrays."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu().clamp(0, 1)
        x = x[None] if x.ndim == 3 else x
        return [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]
    return [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im).astype(np.uint8) for im in images]
