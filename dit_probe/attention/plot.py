"""Pictures of recorded maps: each word's map over the generated image, a grid over layers x steps, an
animated GIF over steps, a token x token matrix (text->text), and ``write_pictures``, which writes them
all for a recording (``dit-probe record`` and ``dit-probe maps`` use it). Every PNG carries provenance
(dit_probe version, model family, relation, prompt) in its metadata."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def _to_hw3(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        img = image.detach().float().cpu()
        if img.ndim == 4:
            img = img[0]
        if img.shape[0] in (1, 3):
            img = img.permute(1, 2, 0)
        return img.clamp(0, 1).numpy()
    return np.asarray(image).astype(np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)


def _upsample(m: torch.Tensor, size) -> np.ndarray:
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def plot_word_maps(maps, words=None, images=None, batch=0, layer=None, step=None, normalise=None, ax_size=2.2):
    """One row: the image, then each word's map (mean over layers, steps, heads) over it. ``images``
    defaults to the images saved with the maps (``maps.save(path, images=...)``), if any."""
    words = words or maps.words
    images = images if images is not None else getattr(maps, "images", None)
    n = len(words) + (images is not None)
    fig, axes = plt.subplots(1, n, figsize=(ax_size * n, ax_size * 1.15), squeeze=False)
    axes = axes[0]
    img = _to_hw3(images[batch] if images is not None and not isinstance(images, np.ndarray) else images) if images is not None else None
    if img is not None:
        axes[0].imshow(img)
        axes[0].set_title(str(maps.prompts[batch])[:28], fontsize=8)
    for ax, w in zip(axes[n - len(words):], words):
        m = maps.word_map(w, layer=layer, step=step, batch=batch, normalise=normalise)
        if img is not None:
            ax.imshow(img)
            ax.imshow(_upsample(m, img.shape[:2]), cmap="jet", alpha=0.5)
        else:
            ax.imshow(m.numpy(), cmap="viridis")
        ax.set_title(f"'{w}' (max {float(m.max()):.2f})", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_layer_step_grid(maps, word, batch=0, normalise=None, ax_size=1.1):
    """A grid of one word's maps: rows are layers, columns are recorded steps."""
    t = maps.tensor(word, normalise=normalise)[:, :, 0, batch, :, 0].nanmean(2)  # (step, layer, y, x)
    steps, layers = maps.steps, maps.layers
    fig, axes = plt.subplots(len(layers), len(steps), figsize=(ax_size * len(steps) + 1.2, ax_size * len(layers)), squeeze=False)
    vmax = float(torch.nan_to_num(t).max())
    for i, layer in enumerate(layers):
        for j, s in enumerate(steps):
            ax = axes[i, j]
            ax.imshow(t[j, i].numpy(), cmap="viridis", vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(layer, fontsize=6, rotation=0, ha="right", va="center")
            if i == 0:
                ax.set_title(f"step {s}", fontsize=7)
    fig.suptitle(f"'{word}': {maps.family}, prompt {maps.prompts[batch]!r}", fontsize=8)
    fig.tight_layout()
    return fig


def _spatial(maps) -> bool:
    return maps.relation != "text->text"


def steps_gif(maps, word, path, batch=0, image=None, normalise=None, fps=3, size=192) -> Path:
    """An animated GIF of ``word``'s map over the recorded steps (mean over layers and heads), on one
    colour scale for all frames, over the image when there is one. Returns the path."""
    t = maps.tensor(word, normalise=normalise)[:, :, 0, batch, :, 0].nanmean(dim=(1, 2))  # (step, y, x)
    vmax = float(torch.nan_to_num(t).max()) or 1.0
    img = _to_hw3(image) if image is not None else None
    if img is not None and max(img.shape[:2]) < size:  # small (toy) images: enlarged, pixels kept sharp
        f = size // max(img.shape[:2])
        img = img.repeat(f, axis=0).repeat(f, axis=1)
    h, w = (img.shape[:2] if img is not None else (size, size * t.shape[-1] // t.shape[-2]))
    cmap = matplotlib.colormaps["jet" if img is not None else "viridis"]
    frames = []
    for i, s in enumerate(maps.steps):
        m = np.nan_to_num(_upsample(t[i], (h, w)) / vmax).clip(0, 1)
        rgb = cmap(m)[..., :3]
        if img is not None:
            rgb = 0.5 * img[..., :3] + 0.5 * rgb
        frame = Image.fromarray((rgb * 255).astype(np.uint8))
        ImageDraw.Draw(frame).text((3, 2), f"{word} step {s}", fill=(255, 255, 255))
        frames.append(frame)
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def plot_text_matrix(maps, batch=0, step=None, layer=None, ax_size=0.35):
    """text->text recordings: each recorded word (row) over the text positions it attends (columns),
    mean over layers, steps and heads; only positions that receive attention above 1% of the maximum."""
    t = maps.tensor(layer=layer, step=step)[:, :, 0, batch, :, :, 0].nanmean(dim=(0, 1, 2))  # (token, text)
    keep = (t.max(0).values > 0.01 * float(t.max())).nonzero().flatten()
    labels = [f"{d['label']}@{d['stream']}" for d in maps.tokens]
    fig, ax = plt.subplots(figsize=(max(3.0, ax_size * len(keep) + 1.5), max(1.5, ax_size * len(labels) + 1)))
    im = ax.imshow(t[:, keep].numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(keep)), [str(int(k)) for k in keep], fontsize=6, rotation=90)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("text position (key)", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(f"text->text, {maps.prompts[batch]!r}"[:60], fontsize=8)
    fig.tight_layout()
    return fig


def provenance(maps, batch=0) -> dict[str, str]:
    """PNG text metadata: what made the picture."""
    return {"Software": f"dit_probe {version('dit_probe')}", "Title": f"{maps.family} {maps.relation} attention",
            "Description": f"prompt {maps.prompts[batch]!r}; layers {len(maps.layers)}; steps {maps.steps}; "
                           f"heads {maps.heads_mode}; branches {maps.branches}"}


def write_pictures(maps, out, words=None, images=None, batch=0) -> list[Path]:
    """Every picture of a recording into ``out``: word_maps.png (each word over the image), and per word
    grid-<word>.png (layers x steps) and steps-<word>.gif; for text->text, text_matrix.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else getattr(maps, "images", None)
    image = None if images is None else images[batch]
    meta, written = provenance(maps, batch), []

    def save(fig, name):
        fig.savefig(out / name, dpi=120, metadata=meta)
        plt.close(fig)
        written.append(out / name)

    if not _spatial(maps):
        save(plot_text_matrix(maps, batch=batch), "text_matrix.png")
        return written
    words = words or maps.words
    save(plot_word_maps(maps, words, images=images, batch=batch), "word_maps.png")
    for w in words:
        slug = "".join(c if c.isalnum() else "-" for c in str(w))
        save(plot_layer_step_grid(maps, w, batch=batch), f"grid-{slug}.png")
        written.append(steps_gif(maps, w, out / f"steps-{slug}.gif", batch=batch, image=image))
    return written
