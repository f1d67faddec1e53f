"""Directions in h-space (the denoiser's hidden states) as EditDirections: unsupervised (PCA of the
states of many generations) and supervised (the difference of class means, optionally with a
correlated attribute's direction projected out). States come from ``dit_probe.hidden.record_states``;
Manipulate adds alpha * delta at the site (``EditDirection.hidden``)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.decomposition import IncrementalPCA

from .directions import EditDirection


def pca_directions(states, k: int = 8, batch_size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The top ``k`` principal axes of ``states`` (samples, features), fitted incrementally (scikit-learn's
    IncrementalPCA, so many generations need not fit in memory at once), and each axis's share of the
    variance. Returns (components (k, features), explained variance ratios (k,))."""
    x = np.asarray(torch.as_tensor(states, dtype=torch.float64).flatten(1))
    if len(x) <= k:
        raise ValueError(f"PCA with k={k} components needs more than {k} samples; got {len(x)}")
    pca = IncrementalPCA(n_components=k, batch_size=batch_size or max(k + 1, min(len(x), 256)))
    pca.fit(x)
    return torch.from_numpy(pca.components_).float(), pca.explained_variance_ratio_


def class_mean_direction(states, labels, positive, negative, remove=None) -> torch.Tensor:
    """mean(states | label == positive) - mean(states | label == negative), over (samples, features);
    with ``remove`` (a direction, or a list of them), their components are projected out, so the edit
    does not also move a correlated attribute."""
    x = torch.as_tensor(states, dtype=torch.float64).flatten(1)
    labels = np.asarray(labels)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} states but {len(labels)} labels")
    groups = {}
    for name, value in (("positive", positive), ("negative", negative)):
        mask = torch.from_numpy(labels == value)
        if not mask.any():
            raise ValueError(f"no state is labelled {value!r} (the {name} class); labels seen: {sorted(set(labels.tolist()))}")
        groups[name] = x[mask].mean(0)
    d = groups["positive"] - groups["negative"]
    others = [] if remove is None else [remove] if torch.as_tensor(remove).ndim == 1 else list(remove)
    if others:  # project out the span of the removed directions (orthonormalised)
        q, _ = torch.linalg.qr(torch.stack([torch.as_tensor(u, dtype=torch.float64).flatten() for u in others], dim=1))
        d = d - q @ (q.T @ d)
    return d.float()


def hidden_direction(site: str, vector, state_shape, steps=None, **meta) -> EditDirection:
    """An EditDirection adding ``vector`` at ``site``: a vector over channels (from states averaged over
    positions) is spread over every position of a state shaped ``state_shape`` ((tokens, C) or (C, h, w));
    a vector of the full state's size is reshaped to it."""
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    shape = tuple(state_shape)
    if v.numel() == int(np.prod(shape)):
        delta = v.view(1, *shape)
    elif len(shape) == 2 and v.numel() == shape[1]:  # tokens: (N, C)
        delta = v.view(1, 1, -1)
    elif len(shape) == 3 and v.numel() == shape[0]:  # spatial: (C, h, w)
        delta = v.view(1, -1, 1, 1)
    else:
        raise ValueError(f"a direction of {v.numel()} values fits neither the state {shape} nor its channels")
    return EditDirection(hidden={site: delta}, hidden_steps=None if steps is None else list(steps),
                         meta={"mode": "hidden", "site": site, **meta})


def jacobian_directions(f, h: torch.Tensor, k: int = 4, iters: int = 20, seed: int = 0):
    """The top ``k`` singular values and right / left singular vectors of the Jacobian df/dh at ``h``,
    by subspace iteration (the h-space seed's Algorithm 1): U = J V by forward-mode JVPs, then
    V_hat = J^T U by one reverse-mode product, V, S^2 = SVD(V_hat); ``iters`` rounds from a seeded Gaussian
    start. Only products with J are formed, never J itself. Returns (S (k,), V (k, *h.shape) the input
    directions, U (k, *f(h).shape) their orthonormal images)."""
    from torch.func import jvp, vjp

    g = torch.Generator().manual_seed(seed)
    n = h.numel()
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    y, pullback = vjp(f, h)
    for _ in range(iters):
        u = torch.stack([jvp(f, (h,), (v[:, i].view_as(h).to(h.dtype),))[1].flatten().double() for i in range(k)], dim=1)
        # J^T U in one reverse pass per column (the pullback is reused: J does not change)
        v_hat = torch.stack([pullback(u[:, i].view_as(y).to(y.dtype))[0].flatten().double() for i in range(k)], dim=1)
        v, s2, _ = torch.linalg.svd(v_hat, full_matrices=False)
    s = s2.sqrt()
    u = torch.stack([jvp(f, (h,), (v[:, i].view_as(h).to(h.dtype),))[1].flatten().double() for i in range(k)], dim=1)
    u, _ = torch.linalg.qr(u)
    return s.float(), v.T.reshape(k, *h.shape).float(), u.T.reshape(k, *y.shape).float()


def denoiser_jacobian(adapter, site: str, z: torch.Tensor, t, cond, guidance_scale: float = 1.0):
    """(f, h0): the denoiser's eps prediction at (z, t, cond) as a function of the state at ``site``, and
    that state's value there, for ``jacobian_directions``. Attention runs through SDPA's math backend
    inside f: torch's fused attention kernels have no forward-mode derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..hidden import intervene, record_states

    with torch.no_grad(), record_states(adapter.pipe, [site], tokens="keep", branch="both") as states:
        adapter.eps(z, t, cond, guidance_scale)
    h0 = states[site][0].to(z.device, z.dtype)  # (rows, ...) of the one call

    def f(h):
        with sdpa_kernel(SDPBackend.MATH), intervene(adapter.pipe, {site: lambda old, call: h.expand_as(old)}, branch="both"):
            return adapter.eps(z, t, cond, guidance_scale)

    return f, h0
