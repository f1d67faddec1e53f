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
