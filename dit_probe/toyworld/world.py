"""The shapes world: one object of known shape, colour and size on a plain background.

Every image is a deterministic function of its attributes and a seed (the seed only moves the
object), so ground truth is exact. Images are 32x32 RGB uint8, drawn 4x supersampled for smooth
edges. Captions follow one template; training drops attribute words at random so prompts that
omit an attribute are in-distribution (the paper's semantic-loss setting).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
# RGB, chosen far apart (>= 100 in RGB distance from each other and from every background)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "pink": (250, 140, 200),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
SIZES = {"small": 7.0, "large": 12.0}  # half-extent in pixels: the object spans about 14 or 24 px
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "background": tuple(BACKGROUNDS)}
GENERIC_SHAPE = "shape"  # the noun used when the shape word is dropped: "a red shape"


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    background: str
    cx: float = IMAGE_SIZE / 2  # object centre in pixels
    cy: float = IMAGE_SIZE / 2

    def __post_init__(self):
        for attr, values in ATTRIBUTES.items():
            if getattr(self, attr) not in values:
                raise ValueError(f"unknown {attr} {getattr(self, attr)!r}; known: {', '.join(values)}")

    @property
    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def caption(self, drop: tuple[str, ...] = ()) -> str:
        return caption(self.attributes, drop)

    def to_dict(self) -> dict:
        return asdict(self)


def caption(attributes: dict[str, str], drop=()) -> str:
    """'a {size} {color} {shape} on a {background} background', leaving out the attributes in
    ``drop`` (or missing from ``attributes``); a dropped shape becomes the generic noun 'shape'."""
    a = {k: v for k, v in attributes.items() if k not in drop}
    words = ["a", a.get("size"), a.get("color"), a.get("shape", GENERIC_SHAPE)]
    text = " ".join(w for w in words if w)
    if "background" in a:
        text += f" on a {a['background']} background"
    return text


def random_scene(rng: random.Random, **fixed) -> Scene:
    """A scene with uniform attributes (those in ``fixed`` kept) and a uniform position that keeps
    the object inside the image."""
    attrs = {a: fixed.get(a) or rng.choice(values) for a, values in ATTRIBUTES.items()}
    r = SIZES[attrs["size"]]
    lo, hi = r + 1, IMAGE_SIZE - r - 1
    cx = fixed.get("cx", rng.uniform(lo, hi))
    cy = fixed.get("cy", rng.uniform(lo, hi))
    return Scene(**attrs, cx=cx, cy=cy)


def scenes(n: int, seed: int, **fixed) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, **fixed) for _ in range(n)]


# ----- rendering -----
def _polygon(u, v, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid."""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]):
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star(points=5, outer=1.0, inner=0.45):
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in unit coordinates (u right, v up; the shape fits [-1, 1]^2)."""
    r2 = u**2 + v**2
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.9
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.0
    if shape == "triangle":
        return _polygon(u, v, [(0.0, 1.0), (-1.0, -0.75), (1.0, -0.75)])
    if shape == "star":
        return _polygon(u, v, _star())
    if shape == "cross":
        return ((abs(u) <= 0.33) & (abs(v) <= 1.0)) | ((abs(v) <= 0.33) & (abs(u) <= 1.0))
    if shape == "heart":
        x, y = u * 1.14, v * 1.12 + 0.12
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel covered by the object, float32 (IMAGE_SIZE, IMAGE_SIZE)."""
    n = IMAGE_SIZE * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units
    x, y = np.meshgrid(centres, centres)
    r = SIZES[scene.size]
    inside = shape_mask(scene.shape, (x - scene.cx) / r, (scene.cy - y) / r)
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene) -> np.ndarray:
    """The scene as an RGB uint8 array (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    a = coverage(scene)[..., None]
    fg = np.array(COLORS[scene.color], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    return np.round(bg * (1 - a) + fg * a).astype(np.uint8)


def render_many(items: list[Scene], size: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8; with ``size``, each render resized (bilinear) to size x size: the same scenes as
    stimuli for a real model at its own resolution (colours, shapes and positions keep their meaning)."""
    if not items:
        return np.zeros((0, size or IMAGE_SIZE, size or IMAGE_SIZE, 3), np.uint8)
    out = np.stack([render(s) for s in items])
    if size is None or size == IMAGE_SIZE:
        return out
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in out])


def drop_pattern(rng: random.Random, p_attribute: float = 0.25, p_caption: float = 0.1):
    """Which attributes a training caption leaves out: each with ``p_attribute``; all of them
    (the empty caption, for classifier-free guidance) with ``p_caption``. Returns None for the empty caption."""
    if rng.random() < p_caption:
        return None
    return tuple(a for a in ATTRIBUTES if rng.random() < p_attribute)


def training_caption(scene: Scene, rng: random.Random, p_attribute: float = 0.25, p_caption: float = 0.1) -> str:
    drop = drop_pattern(rng, p_attribute, p_caption)
    return "" if drop is None else scene.caption(drop)


VOCABULARY = sorted(
    {"a", "on", "background", GENERIC_SHAPE} | set(SHAPES) | set(COLORS) | set(SIZES) | set(BACKGROUNDS)
)
