"""Image-side directions by score distillation at a fixed timestep (paper Eq. 1, footnote 3; docs/design.md, section 5).

All three methods move a copy z'_t of the noised source latent z_t and return n_zt = z'_t - z_t.
``eps(z, cond)`` is the model's noise prediction at the editing timestep (flow models: converted
from v by the adapter); no gradient of the model is needed.

- HSDS (Eq. 1): an alignment term a = 2 (eps(z'_t, z~_c) - eps(z'_t, z_s)) and a restraint
  r = 2 lambda (eps(z_t, z~_c) - eps(z'_t, z~_c)); z'_t <- z'_t + eta_k (sign * a + r).
  The paper writes the update as z'_t = z_t + eta * dHSDS ("ascent", sign +1); "descent" (sign -1)
  reads its "minimise" literally. ``sign`` applies to the alignment term only: the restraint always
  pulls z'_t back towards z_t (eps grows with z, so eps(z_t) - eps(z'_t) points from z'_t to z_t),
  which is what the paper says lambda is for ("the degree to which z'_t should be close to z_t").
  Until issue 15 the sign multiplied the restraint too, so under descent a larger lambda pushed
  z'_t *away* from z_t (the committed Fig. 11 table showed ||n_zt|| growing with lambda).
  The default convention is chosen by the ``hsds-conventions`` study (docs/editing.md).
  Both eps evaluations of an iteration run in one batched forward pass; eps(z_t, z~_c) does not
  change between iterations and is computed once.
- SDS: g = eps(z'_t, z_s) - eps_t (eps_t: the encoding noise), z'_t <- z'_t - eta_k g.
- DDS: g = eps(z'_t, target) - eps(z_t, source), z'_t <- z'_t - eta_k g (shared noise and timestep).
Step sizes decay geometrically from ``eta_start`` to ``eta_end`` over the iterations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..adapters import Conditioning


@dataclass
class DistillSettings:
    iterations: int = 20
    eta_start: float = 0.1
    eta_end: float = 0.01
    lam: float = 0.5  # HSDS lambda: how strongly z'_t is held near z_t (paper: 0.1-1.0)
    sign: str = "descent"  # HSDS alignment: "descent" (z' - eta a) or "ascent" (z' + eta a, the paper's formula)
    cfg: bool = True  # classifier-free guidance inside eps (the editor's guidance scale; measured default) or cond only
    # HSDS and alpha: "scale" distils once towards the target caption (alpha 1) and adds alpha * n_zt;
    # "per-alpha" is the paper's form: distil towards z_c0 + alpha n_c for every alpha and add n_zt(alpha)
    alpha_form: str = "scale"

    def check(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not (self.eta_start > 0 and self.eta_end > 0):
            raise ValueError(f"step sizes must be > 0, got eta_start={self.eta_start}, eta_end={self.eta_end}")
        if self.sign not in ("ascent", "descent"):
            raise ValueError(f"sign must be 'ascent' or 'descent', got {self.sign!r}")
        if self.alpha_form not in ("scale", "per-alpha"):
            raise ValueError(f"alpha_form must be 'scale' or 'per-alpha', got {self.alpha_form!r}")

    def etas(self) -> np.ndarray:
        if self.iterations == 1:
            return np.array([self.eta_start])
        return np.geomspace(self.eta_start, self.eta_end, self.iterations)

    def as_dict(self) -> dict:
        return asdict(self)


def hsds(eps, z_t, c_tilde: Conditioning, c_s: Conditioning, settings: DistillSettings, batched: bool = True):
    """n_zt by Hessian score distillation (Eq. 1). ``batched=False`` runs the two evaluations of an
    iteration as separate calls (the reference the batched path is tested against)."""
    settings.check()
    sign = 1.0 if settings.sign == "ascent" else -1.0
    anchor = eps(z_t, c_tilde)  # eps(z_t, z~_c): fixed over the iterations
    both = Conditioning.cat([c_tilde, c_s]) if batched else None
    z = z_t.clone()
    for eta in settings.etas():
        if batched:
            e_tilde, e_s = eps(torch.cat([z, z]), both).chunk(2)
        else:
            e_tilde, e_s = eps(z, c_tilde), eps(z, c_s)
        align, restrain = 2 * (e_tilde - e_s), 2 * settings.lam * (anchor - e_tilde)
        z = z + float(eta) * (sign * align + restrain)
    return z - z_t


def sds(eps, z_t, c_s: Conditioning, noise, settings: DistillSettings):
    """n_zt by score distillation towards the target phrase (the SDS baseline)."""
    settings.check()
    z = z_t.clone()
    for eta in settings.etas():
        z = z - float(eta) * (eps(z, c_s) - noise)
    return z - z_t


def dds(eps, z_t, c_target: Conditioning, c_source: Conditioning, settings: DistillSettings):
    """n_zt by delta denoising score (the DDS baseline, Hertz et al. 2023) at a fixed timestep."""
    settings.check()
    anchor = eps(z_t, c_source)
    z = z_t.clone()
    for eta in settings.etas():
        z = z - float(eta) * (eps(z, c_target) - anchor)
    return z - z_t
