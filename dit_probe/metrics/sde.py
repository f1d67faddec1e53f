"""The Semantic Disentanglement metric (paper Eq. 2):

    SDE = ||x - h(f(x,t), c, t)|| / ||x - h(f(x,t), c~, t)||  +  ||x - h(f(x,t), c~, t)||

f forwards x to timestep t (the editing strength) with one noise sample that **both** branches share,
h denoises from t and decodes, c describes x, and c~ is c with one binary attribute flipped. Lower is
better: the first term is small when the flipped prompt moves the image (effectiveness), the second
when it moves it little overall (decomposability).

The norm: pixels in [0, 1], root-mean-square over pixels and channels (``norm="rms"``, the default:
resolution-independent), or the plain Euclidean norm (``norm="l2"``, the paper's literal formula,
which grows with the image size). The choice is written next to every result.
"""

from __future__ import annotations

import numpy as np

NORMS = ("rms", "l2")


def _distance(x, y, norm):
    d = (np.asarray(x, np.float64) - np.asarray(y, np.float64)).reshape(len(x), -1)
    if norm == "rms":
        return np.sqrt((d**2).mean(1))
    if norm == "l2":
        return np.sqrt((d**2).sum(1))
    raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")


def _unit(images) -> np.ndarray:
    """uint8 0..255 or float 0..1 images -> float 0..1."""
    a = np.asarray(images)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def sde_terms(x, x_hat, x_tilde, norm: str = "rms") -> dict[str, np.ndarray]:
    """Per image: ``kept`` = ||x - x_hat|| (reconstruction under c), ``flipped`` = ||x - x_tilde||
    (under c~), and ``sde`` = kept / flipped + flipped. Images: (N, H, W, C), uint8 or floats in [0, 1]."""
    x, x_hat, x_tilde = _unit(x), _unit(x_hat), _unit(x_tilde)
    if not (x.shape == x_hat.shape == x_tilde.shape):
        raise ValueError(f"SDE needs three image arrays of one shape, got {x.shape}, {x_hat.shape}, {x_tilde.shape}")
    kept, flipped = _distance(x, x_hat, norm), _distance(x, x_tilde, norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = kept / flipped
    return {"kept": kept, "flipped": flipped, "ratio": ratio, "sde": ratio + flipped}


def sde(editor, images, prompts, flipped_prompts, seeds=0, norm: str = "rms", omitted_prompts=None) -> dict[str, np.ndarray]:
    """SDE of each image with an ``EIMEditor`` (its strength is t): one encoding (VAE + forward noise from
    ``seeds``), denoised once under ``prompts`` and once under ``flipped_prompts``. Returns the terms of
    ``sde_terms`` plus the two reconstructions (uint8) and the timestep. With ``omitted_prompts`` (the
    captions without the attribute: Eq. 2's precondition), also ``x_omit`` from the same encoding."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    enc = editor.encode(images, prompts, seeds)
    x_hat = editor.reconstruct(enc)
    x_tilde = editor.reconstruct(enc, flipped_prompts)
    x = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    out = {**sde_terms(x, x_hat, x_tilde, norm), "x_hat": x_hat, "x_tilde": x_tilde, "timestep": float(enc.t)}
    if omitted_prompts is not None:
        out["x_omit"] = editor.reconstruct(enc, omitted_prompts)
    return out
