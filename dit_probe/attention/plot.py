"""Plot helpers: a word's map over the generated image, and a grid over layers x steps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F


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
    """One row: the image, then each word's map (mean over layers, steps, heads) over it."""
    words = words or maps.words
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
