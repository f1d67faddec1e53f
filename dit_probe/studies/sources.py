"""Images with known attributes, their captions and their judge: what the semantic-loss sweep and the
SDE metric run on.

- ``ToySource``: renders of the shapes world (exact labels, the exact toy judge). Binary pairs for
  SDE: a colour pair, a shape pair, size, background.
- ``CelebASource``: a user-supplied CelebA folder (``list_attr_celeba.txt`` and ``img_align_celeba/``),
  binary attributes from the annotation file, captions from per-attribute phrases, and a CLIP
  zero-shot judge over the same phrases.

A source gives ``sample(n, seed, binary=None, size=None)`` -> ``Items`` (uint8 images at the model's
size, one label dict per image), ``caption(labels, drop=())``, ``flip(attribute, value)`` and ``judge``.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..editing import MODES, DistillSettings, EIMEditor
from ..metrics import psnr, ssim
from ..registry import load_pipeline
from ..toyworld import ATTRIBUTES, Judge, caption, render_many, scenes
from ..toyworld.world import IMAGE_SIZE, coverage, random_scene
from .levels import LevelSettings


@dataclass
class Items:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: list[dict[str, str]]

    def __len__(self):
        return len(self.labels)


class ToySource:
    name = "toy"
    # the binary attribute pairs of the toy Table 3 (SDE); the sweep uses every value
    PAIRS = {"color": ("red", "blue"), "shape": ("circle", "square"), "size": ("small", "large"),
             "background": ("black", "white")}

    def __init__(self):
        self.values = dict(ATTRIBUTES)
        self.judge = Judge()

    def check(self, attribute: str) -> None:
        self.judge.check(attribute)

    def caption(self, labels: dict, drop=()) -> str:
        return caption(labels, drop)

    def flip(self, attribute: str, value: str) -> str:
        self.check(attribute)
        a, b = self.PAIRS[attribute]
        if value not in (a, b):
            raise ValueError(f"{attribute} {value!r} is not in the binary pair {a!r} / {b!r}")
        return b if value == a else a

    def sample(self, n: int, seed: int, binary: str | None = None, size: int | None = None) -> Items:
        """n random scenes; with ``binary``, that attribute drawn from its pair (for SDE). Renders are
        the toy models' 32x32; another ``size`` is refused (the toy judge reads 32x32 only)."""
        if size not in (None, IMAGE_SIZE):
            raise ValueError(f"toy renders are {IMAGE_SIZE}x{IMAGE_SIZE}; this model works at {size}: use a toy model")
        if int(n) < 1:
            raise ValueError(f"the number of scenes to sample must be at least 1, got {n}")

        if binary is None:
            items = scenes(n, seed)
        else:
            self.check(binary)
            rng = random.Random(seed)
            items = [random_scene(rng, **{binary: rng.choice(self.PAIRS[binary])}) for _ in range(n)]
        return Items(render_many(items), [s.attributes for s in items])


# CelebA: attribute -> (column of list_attr_celeba.txt, phrase when the column is 1, phrase when -1).
# Table 3's six attributes; hair is blond vs not blond (the file has no single hair-colour column).
CELEBA_ATTRIBUTES = {
    "age": ("Young", "young", "old"),
    "gender": ("Male", "male", "female"),
    "expression": ("Smiling", "smiling", "with a neutral expression"),
    "hair": ("Blond_Hair", "with blond hair", "with dark hair"),
    "eyeglasses": ("Eyeglasses", "wearing eyeglasses", "without eyeglasses"),
    "hat": ("Wearing_Hat", "wearing a hat", "without a hat"),
}
CELEBA_FILES = "list_attr_celeba.txt and img_align_celeba/ (the aligned JPEGs, e.g. img_align_celeba/000001.jpg)"


class CelebAError(ValueError):
    """A CelebA folder that is missing or malformed."""


def read_celeba_attributes(folder) -> tuple[list[str], list[str], np.ndarray]:
    """(file names, column names, (N, columns) int8 array of +1/-1) from ``folder/list_attr_celeba.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CelebAError(f"CelebA folder {folder} does not exist: it must hold {CELEBA_FILES}")
    path = folder / "list_attr_celeba.txt"
    if not path.exists():
        raise CelebAError(f"{folder} has no list_attr_celeba.txt: a CelebA folder must hold {CELEBA_FILES}")
    lines = path.read_text().splitlines()
    if len(lines) < 3 or not lines[0].strip().isdigit():
        raise CelebAError(f"{path} is malformed: line 1 must be the number of images, line 2 the attribute names, "
                          "then one line per image ('000001.jpg -1 1 ...')")
    columns = lines[1].split()
    names, rows = [], []
    for k, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(columns) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise CelebAError(f"{path} line {k} is malformed: expected a file name and {len(columns)} values of 1 "
                              f"or -1, got {line[:80]!r}")
        names.append(parts[0])
        rows.append([int(v) for v in parts[1:]])
    if int(lines[0]) != len(names):
        raise CelebAError(f"{path} says {int(lines[0])} images on line 1 but lists {len(names)}")
    return names, columns, np.array(rows, np.int8)


class CelebASource:
    name = "celeba"

    def __init__(self, folder, attributes=None, clip="openai/clip-vit-large-patch14"):
        """folder: the CelebA root; attributes: names from ``CELEBA_ATTRIBUTES`` (default all six);
        clip: the CLIP judge's model (hub id, local folder, or a ``Clip``)."""
        self.folder = Path(folder)
        self.files, columns, self.table = read_celeba_attributes(self.folder)
        self.spec = {a: CELEBA_ATTRIBUTES[a] for a in (attributes or CELEBA_ATTRIBUTES) if self._known(a)}
        missing = [c for c, _, _ in self.spec.values() if c not in columns]
        if missing:
            raise CelebAError(f"{self.folder / 'list_attr_celeba.txt'} lacks the column(s) {missing}; its columns: {columns}")
        self.column = {a: columns.index(c) for a, (c, _, _) in self.spec.items()}
        self.images_dir = self.folder / "img_align_celeba" if (self.folder / "img_align_celeba").is_dir() else self.folder
        self.values = {a: (pos, neg) for a, (_, pos, neg) in self.spec.items()}
        self._clip, self._judge = clip, None

    @staticmethod
    def _known(attribute):
        if attribute not in CELEBA_ATTRIBUTES:
            raise KeyError(f"unknown CelebA attribute {attribute!r}; known: {', '.join(CELEBA_ATTRIBUTES)}")
        return True

    def check(self, attribute: str) -> None:
        if attribute not in self.values:
            raise KeyError(f"the CelebA source was set up for {', '.join(self.values)}, not {attribute!r}")

    @property
    def judge(self):
        if self._judge is None:
            from ..metrics.clip import ClipJudge

            self._judge = ClipJudge({a: {v: f"a photo of a person {v}" for v in vals} for a, vals in self.values.items()},
                                    self._clip)
        return self._judge

    def caption(self, labels: dict, drop=()) -> str:
        phrases = [labels[a] for a in self.values if a in labels and a not in drop]
        return "a photo of a person" + (", " + ", ".join(phrases) if phrases else "")

    def flip(self, attribute: str, value: str) -> str:
        self.check(attribute)
        pos, neg = self.values[attribute]
        return neg if value == pos else pos

    def _load(self, name, size: int) -> np.ndarray:
        path = self.images_dir / name
        if not path.exists():
            raise CelebAError(f"image {name} listed in list_attr_celeba.txt is not in {self.images_dir}; "
                              f"a CelebA folder must hold {CELEBA_FILES}")
        im = Image.open(path).convert("RGB")
        side = min(im.size)  # centre square crop, then the model's size
        left, top = (im.width - side) // 2, (im.height - side) // 2
        return np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC))

    def sample(self, n: int, seed: int, binary: str | None = None, size: int | None = None) -> Items:
        """n random images (centre-cropped, resized to ``size``, default 512) with their labels."""
        if binary is not None:
            self.check(binary)
        if n > len(self.files):
            raise CelebAError(f"asked for {n} images but {self.folder} lists {len(self.files)}")
        rows = np.random.default_rng(seed).choice(len(self.files), n, replace=False)
        labels = [{a: self.values[a][0 if self.table[r, c] > 0 else 1] for a, c in self.column.items()} for r in rows]
        return Items(np.stack([self._load(self.files[r], size or 512) for r in rows]), labels)


def make_source(kind: str = "toy", celeba=None, attributes=None, clip=None):
    """'toy' or 'celeba' (with the folder)."""
    if kind == "toy":
        return ToySource()
    if kind == "celeba":
        if not celeba:
            raise CelebAError(f"source 'celeba' needs the CelebA folder (celeba: PATH), holding {CELEBA_FILES}")
        kwargs = {"clip": clip} if clip else {}
        return CelebASource(celeba, attributes, **kwargs)
    raise ValueError(f"unknown image source {kind!r}; choose 'toy' or 'celeba'")


def source_for(cfg, every_attribute: bool = False):
    """The image source a config names (``source``, ``celeba``, ``clip``), checked against the attributes it
    studies. ``every_attribute``: load all of the source's attributes (collateral is read on the others)."""
    source = make_source(cfg.source, cfg.celeba, None if every_attribute else cfg.attributes, cfg.clip)
    for a in cfg.attributes:
        source.check(a)
    return source


# ----- edits with known targets (the editing studies share them) -----
EDITABLE = ("color", "size", "shape")  # toy attributes an edit can change (background is the scene itself)
REFERENCE_MODES = [m for m, (_, method) in MODES.items() if method == "reference"]  # need the target image


def toy_edit_pairs(attribute: str, n: int, seed: int):
    """n (source scene, target scene) pairs that differ only in ``attribute`` (the target value uniform
    over the other values)."""
    rng = random.Random(seed * 7919 + EDITABLE.index(attribute))
    pairs = []
    for s in scenes(n, seed=seed * 1000 + EDITABLE.index(attribute)):
        value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(s, attribute)])
        pairs.append((s, type(s)(**{**s.to_dict(), attribute: value})))
    return pairs


def phrase_for(scene, attribute: str) -> str:
    """The target attribute alone, as an in-distribution toy caption: 'a blue shape', 'a large shape', 'a star'."""
    return scene.caption(drop=tuple(a for a in ATTRIBUTES if a != attribute))


def background_mask(source, target) -> np.ndarray:
    """Pixels that are background in both renders (no object coverage in either)."""
    return (coverage(source) == 0) & (coverage(target) == 0)


def edit_set(source, attribute: str, n: int, seed: int, size: int | None = None) -> dict:
    """The edits of one attribute: source images and labels, target labels, captions, target phrases,
    background masks, and (toy) the target renders. Toy: random scenes with the attribute changed to a
    random other value, exact background masks. CelebA: the binary attribute flipped; no masks (the
    whole image is scored) and no target images."""
    if isinstance(source, ToySource):
        pairs = toy_edit_pairs(attribute, n, seed)
        return {"rgb": render_many([s for s, _ in pairs]), "sources": [s.attributes for s, _ in pairs],
                "targets": [t.attributes for _, t in pairs], "phrases": [phrase_for(t, attribute) for _, t in pairs],
                "masks": np.stack([background_mask(s, t) for s, t in pairs]),
                "target_rgb": render_many([t for _, t in pairs])}
    items = source.sample(n, seed, size=size)
    targets = [{**lab, attribute: source.flip(attribute, lab[attribute])} for lab in items.labels]
    return {"rgb": items.images, "sources": items.labels, "targets": targets,
            "phrases": [source.caption({attribute: t[attribute]}) for t in targets],
            "masks": np.ones(items.images.shape[:3], bool), "target_rgb": None}


def judge_edits(judge, images, sources: list[dict], targets: list[dict], attribute, alphas, sources_rgb, masks):
    """One row per (edit, alpha): the judge's reading of every edited image against the source and target
    labels (attribute -> value dicts). Works with any judge (toy or CLIP)."""
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
    outputs, the true image direction n_ref (the target render noised alike, minus z_t), and the edited
    images (edits, alphas, H, W, 3)."""

    pairs: list
    sources: np.ndarray
    masks: np.ndarray
    seeds: list[int]
    enc: object
    direction: object
    n_ref: object
    images: np.ndarray

    def cos_ref(self) -> np.ndarray:
        """cos(n_zt, n_ref) per edit (NaN without an image side): how well the image side finds the truth."""
        if self.direction.image is None:
            return np.full(len(self.pairs), np.nan)
        a, b = self.direction.image_at(1.0).flatten(1).double(), self.n_ref.flatten(1).double()
        return (torch.nn.functional.cosine_similarity(a, b, dim=1)).cpu().numpy()


def split_mode(mode: str) -> tuple[str, bool]:
    """'hsds-only/omit' -> ('hsds-only', True): an image-side-only mode run with the source caption that
    omits the edited attribute (in distribution: the toy models were trained with word dropout)."""
    base, _, caption = mode.partition("/")
    return base, caption == "omit"


def edit_batch(editor, attribute: str, mode: str, n: int, seed: int, alphas) -> EditBatch:
    """Encode, Identify and Manipulate for ``n`` toy edits of ``attribute`` at every alpha (one batch)."""
    base, omit = split_mode(mode)
    pairs = toy_edit_pairs(attribute, n, seed)
    sources, targets = render_many([s for s, _ in pairs]), render_many([t for _, t in pairs])
    masks = np.stack([background_mask(s, t) for s, t in pairs])
    seeds = [seed * 100_000 + i for i in range(len(pairs))]
    enc = editor.encode(sources, [s.caption(drop=(attribute,) if omit else ()) for s, _ in pairs], seeds)
    direction = editor.identify(enc, [t.caption() for _, t in pairs], base, [phrase_for(t, attribute) for _, t in pairs],
                                reference=targets if base in REFERENCE_MODES else None, alphas=alphas)
    n_ref = editor.reference_direction(enc, targets)
    return EditBatch(pairs, sources, masks, seeds, enc, direction, n_ref, editor.manipulate(enc, direction, alphas))


class EditorSettings(LevelSettings):
    """How the editing studies denoise (None keeps the model's default steps and guidance), and at which
    noise levels (``studies.levels``: the editor's strength is set per unit by ``apply_level``)."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def editor(self, model: str, **kwargs) -> EIMEditor:
        return EIMEditor(load_pipeline(model), num_inference_steps=self.num_inference_steps,
                         guidance_scale=self.guidance_scale, **kwargs)


class EditSourceSettings(EditorSettings):
    """Editing settings plus where the images come from. Subclassed by the editing studies' configs."""

    source: str = "toy"  # toy | celeba (binary attributes flipped, read by the CLIP judge)
    celeba: str | None = None  # the CelebA folder
    clip: str | None = None  # the CLIP judge's model for real images (hub id or folder)

    def check_editable(self, attributes) -> None:
        bad = [a for a in attributes if a not in EDITABLE]
        if self.source == "toy" and bad:
            raise ValueError(f"attributes {bad} cannot be edited in the toy world; choose from {list(EDITABLE)}")


def distill_settings(overrides: dict) -> DistillSettings:
    """DistillSettings with a config's overrides; an unknown field or a bad value is a clear error."""
    known = {f.name for f in dataclasses.fields(DistillSettings)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"distill: unknown setting(s) {bad}; valid: {sorted(known)}")
    d = DistillSettings(**overrides)
    d.check()
    return d


def check_modes(modes, references: bool = False, omit: bool = False) -> None:
    """Editing modes a study can run: every editor mode; the reference ones only where the target image is
    known (``references``); '/omit' (the caption without the edited attribute) only where the study can
    write that caption (``omit``) and only for modes without a text side."""
    allowed = [m for m in MODES if references or m not in REFERENCE_MODES]
    for mode in modes:
        base, drop = split_mode(mode)
        if base not in allowed or mode.count("/") > (1 if drop and omit else 0):
            raise ValueError(f"mode {mode!r} is not available here; choose from {allowed}"
                             + (" (image-side-only modes may add '/omit')" if omit else ""))
        if drop and MODES[base][0]:
            raise ValueError(f"mode {mode!r}: '/omit' is for modes without a text side (the text side changes "
                             "the caption itself)")
