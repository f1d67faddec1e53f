"""Pixel metrics between images, optionally inside a mask (e.g. the background of an edit).

Both take (N, H, W, C) or (H, W, C) arrays on one scale (uint8 0..255 by default) and a mask of
(N, H, W) or (H, W) booleans, True where pixels count.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def _pairs(a, b, mask):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image metrics need images of the same shape, got {a.shape} and {b.shape}")
    single = a.ndim == 3
    if single:
        a, b = a[None], b[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if a.ndim != 4:
        raise ValueError(f"expected images shaped (N, H, W, C) or (H, W, C), got {a.shape}")
    m = np.ones(a.shape[:3], bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), a.shape[:3])
    return a, b, m, single


def psnr(a, b, mask=None, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image pair: 10 log10(range^2 / MSE) over the masked pixels.

    Identical pixels give +inf; an empty mask gives NaN.
    """
    a, b, m, single = _pairs(a, b, mask)
    sq = ((a - b) ** 2).mean(axis=-1)  # per pixel, mean over channels
    count = m.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = np.where(count > 0, (sq * m).sum(axis=(1, 2)) / count, np.nan)
        out = 10 * np.log10(data_range**2 / mse)
    return out[0] if single else out


def ssim(a, b, mask=None, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity per image pair (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    k1 0.01, k2 0.03, via torchmetrics), averaged over channels and over the masked pixels of the
    SSIM map. Windows near the mask's edge see some unmasked pixels: the mask selects where the map is
    read, as in masked background-preservation scores. Identical images give 1; an empty mask NaN."""
    a, b, m, single = _pairs(a, b, mask)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2)
    tb = torch.from_numpy(b).permute(0, 3, 1, 2)
    _, full = structural_similarity_index_measure(ta, tb, data_range=data_range, reduction="none",
                                                  return_full_image=True)
    smap = full.mean(1).numpy()  # (N, H, W), mean over channels
    count = m.sum(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        out = np.where(count > 0, (smap * m).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)
    return out[0] if single else out
