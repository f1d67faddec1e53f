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

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
        from ..toyworld import ATTRIBUTES, Judge

        self.values = dict(ATTRIBUTES)
        self.judge = Judge()

    def check(self, attribute: str) -> None:
        self.judge.check(attribute)

    def caption(self, labels: dict, drop=()) -> str:
        from ..toyworld import caption

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
        from ..toyworld import render_many, scenes
        from ..toyworld.world import IMAGE_SIZE, random_scene

        if size not in (None, IMAGE_SIZE):
            raise ValueError(f"toy renders are {IMAGE_SIZE}x{IMAGE_SIZE}; this model works at {size}: use a toy model")

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
        from PIL import Image

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


@dataclass
class EditSourceSettings:
    """Settings shared by the studies that edit images: where the images come from and how they are
    denoised (None keeps the model's default steps and guidance). Subclassed by their configs."""

    source: str = "toy"  # toy | celeba (binary attributes flipped, read by the CLIP judge)
    celeba: str | None = None  # the CelebA folder
    clip: str | None = None  # the CLIP judge's model for real images (hub id or folder)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    def check_editable(self, attributes) -> None:
        from .toy_editing import EDITABLE

        bad = [a for a in attributes if a not in EDITABLE]
        if self.source == "toy" and bad:
            raise ValueError(f"attributes {bad} cannot be edited in the toy world; choose from {list(EDITABLE)}")
