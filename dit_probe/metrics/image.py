"""Pixel metrics between images, optionally inside a mask (e.g. the background of an edit)."""

from __future__ import annotations

import numpy as np


def psnr(a, b, mask=None, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image pair: 10 log10(range^2 / MSE) over the masked pixels.

    a, b: (N, H, W, C) or (H, W, C) arrays on the same scale; mask: (N, H, W) or (H, W) bool, True where
    pixels count (None: all). Identical pixels give +inf; an empty mask gives NaN.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of the same shape, got {a.shape} and {b.shape}")
    single = a.ndim == 3
    if single:
        a, b = a[None], b[None]
        mask = None if mask is None else np.asarray(mask)[None]
    m = np.ones(a.shape[:3], bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), a.shape[:3])
    sq = ((a - b) ** 2).mean(axis=-1)  # per pixel, mean over channels
    count = m.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = np.where(count > 0, (sq * m).sum(axis=(1, 2)) / count, np.nan)
        out = 10 * np.log10(data_range**2 / mse)
    return out[0] if single else out
