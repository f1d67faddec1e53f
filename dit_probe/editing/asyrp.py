"""Asyrp, the asymmetric reverse process (the Asyrp seed): an h-space edit that changes what the
denoiser predicts the clean image to be, but not the way back to the noise.

A deterministic step recombines the two things a prediction at (z, t) implies, the clean image x0 and the
noise eps, at the next noise level: z' = a' x0 + b' eps (DDIM with eta = 0; a flow Euler step is the same
with a' = 1 - sigma'). Adding delta h inside the denoiser changes both, and the two changes largely undo
each other (the seed's motivation for the asymmetric process). Asyrp predicts twice, x0~ with the edit and
eps without, and takes z' = a' x0~ + b' eps = step(plain) + a' (x0~ - x0); ``EIMEditor.manipulate`` does so
for an ``EditDirection`` with ``asymmetric=True``, only at its ``hidden_steps`` (the edit interval).

- ``edit_interval``: the seed's rule for where to edit: from the start while the predicted x0 is still
  far from the image (distance >= ``threshold``; the seed uses LPIPS = 0.33), after which the plain
  process finishes the image.
- ``DeltaH`` and ``train_delta_h``: the seed's learned, state-dependent edit delta h_t = f_t(h), trained
  along the asymmetric trajectory with an attribute loss on the decoded x0~ (any differentiable function
  of the images: for the toy world the attribute classifier ``toyworld.classifier``, never the judge) and
  a reconstruction term |x0~ - x0|.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from ..hidden import intervene, record_states
from ..metrics import ssim
from .directions import EditDirection


class DeltaH(nn.Module):
    """delta h = f(h, t): an MLP over the channels of h at each position (a 1x1 convolution for a UNet's
    spatial state) with a sinusoidal embedding of t (the scheduler's time in [0, 1]). The output layer
    starts at zero, so an untrained DeltaH is the identity edit."""

    def __init__(self, channels: int, layout: str, width: int = 128, time_dim: int = 32):
        super().__init__()
        if layout not in ("spatial", "tokens"):
            raise ValueError(f"layout must be 'spatial' (C, h, w) or 'tokens' (N, C), got {layout!r}")
        self.channels, self.layout, self.width, self.time_dim = channels, layout, width, time_dim
        self.inp = nn.Linear(channels + time_dim, width)
        self.out = nn.Linear(width, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def config(self) -> dict:
        return {"channels": self.channels, "layout": self.layout, "width": self.width, "time_dim": self.time_dim}

    def embed(self, t: float) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.time_dim // 2) / (self.time_dim // 2))
        angles = 1000.0 * float(t) * freqs
        return torch.cat([angles.sin(), angles.cos()])

    def forward(self, h: torch.Tensor, t: float) -> torch.Tensor:
        x = h.movedim(1, -1) if self.layout == "spatial" else h  # channels last
        if x.shape[-1] != self.channels:
            raise ValueError(f"this DeltaH was built for {self.channels} channels, the state has {x.shape[-1]}")
        emb = self.embed(t).to(x).expand(*x.shape[:-1], self.time_dim)
        d = self.out(nn.functional.silu(self.inp(torch.cat([x, emb], -1))))
        return d.movedim(-1, 1) if self.layout == "spatial" else d


def _images(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def one_minus_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - SSIM per image pair (uint8 arrays): the interval rule's distance where LPIPS' ImageNet
    backbone is not available (``metrics.lpips.LPIPS(backbone=PATH).distance`` plugs in the seed's own)."""
    return 1 - ssim(a, b)


@torch.no_grad()
def predicted_x0_distances(editor, enc, distance=one_minus_ssim) -> tuple[list[int], np.ndarray]:
    """Along the plain denoising from the encoded start: each step's scheduler index and the mean over
    images of ``distance(image, decoded x0 predicted at that step)``."""
    adapter = editor.adapter
    source = _images(adapter.decode_latents(enc.z0))
    z = enc.zt
    timesteps = adapter.set_timesteps(editor.num_inference_steps, editor.strength, latents=z)
    first = len(adapter.pipe.scheduler.timesteps) - len(timesteps)
    steps, dist = [], []
    for i, t in enumerate(timesteps):
        out = editor._predict(z, t, enc.cond, editor.guidance_scale)
        x0 = _images(adapter.decode_latents(adapter.to_x0(out, z, t)))
        steps.append(first + i)
        dist.append(float(np.mean(distance(source, x0))))
        z = adapter.step(out, t, z)
    return steps, np.array(dist)


def edit_interval(editor, enc, threshold: float = 0.33, distance=one_minus_ssim) -> list[int]:
    """The seed's edit interval [T, t_edit]: the steps from the start whose predicted x0 is still at least
    ``threshold`` away from the image (mean over the encoded images), at least the first step. Returns
    scheduler-step indices (``EditDirection.hidden_steps``)."""
    steps, dist = predicted_x0_distances(editor, enc, distance)
    far = [s for s, d in zip(steps, dist) if d >= threshold]
    keep = [steps[0]]
    for s in steps[1:]:  # the interval is contiguous from the start
        if s not in far:
            break
        keep.append(s)
    return keep


@contextlib.contextmanager
def _frozen(*modules):
    """Parameters of ``modules`` without gradients while training something else through them."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _state_channels(editor, enc, site: str) -> tuple[int, str]:
    layout = editor.adapter.hidden_site(site).layout
    with torch.no_grad(), record_states(editor.pipe, [site], branch="both") as states:
        editor._predict(enc.zt[:1], enc.t, enc.cond.map(lambda x: x[:1]), editor.guidance_scale)
    return states[site].shape[-1], layout


def train_delta_h(editor, enc, site: str, attribute_loss, steps: list[int], recon: float = 1.0, epochs: int = 4,
                  lr: float = 1e-3, batch_size: int = 8, seed: int = 0, log=None) -> tuple[DeltaH, list[float]]:
    """Train a DeltaH at ``site`` on the encoded images: at every step of the interval ``steps`` (scheduler
    indices), x0~ predicted with h + f(h, t) in both CFG branches, loss = attribute_loss(decoded x0~) +
    ``recon`` * mean |x0~ - x0|, one optimiser step per denoising step (as the seed trains), the latent
    then moved along the asymmetric process. Returns the network and the loss of every update."""
    adapter = editor.adapter
    torch.manual_seed(seed)
    channels, layout = _state_channels(editor, enc, site)
    net = DeltaH(channels, layout).to(enc.zt.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.randperm(len(enc), generator=torch.Generator().manual_seed(seed))
    losses = []
    edit = {site: lambda h, call: h + net(h, call.time)}
    with _frozen(adapter.denoiser, adapter.pipe.vae):
        for epoch in range(epochs):
            for lo in range(0, len(enc), batch_size):
                rows = order[lo:lo + batch_size]
                z, cond = enc.zt[rows], enc.cond.map(lambda x: x[rows])
                timesteps = adapter.set_timesteps(editor.num_inference_steps, editor.strength, latents=z)
                first = len(adapter.pipe.scheduler.timesteps) - len(timesteps)
                for i, t in enumerate(timesteps):
                    if first + i > max(steps):
                        break  # past the interval: nothing left to train on this batch
                    with torch.no_grad():
                        plain = editor._predict(z, t, cond, editor.guidance_scale)
                        x0 = adapter.to_x0(plain, z, t)
                    if first + i not in steps:
                        z = adapter.step(plain, t, z)
                        continue
                    with intervene(editor.pipe, edit, branch="both"):
                        x0e = adapter.to_x0(editor._predict(z, t, cond, editor.guidance_scale), z, t)
                    loss = attribute_loss(adapter.decode_latents(x0e)) + recon * (x0e - x0).abs().mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    with torch.no_grad():
                        z = adapter.step(plain, t, z) + adapter.next_signal_scale(t) * (x0e.detach() - x0)
            if log is not None:
                log(f"delta h epoch {epoch + 1}/{epochs}: loss {np.mean(losses[-max(1, len(losses) // (epoch + 1)):]):.4f}")
    return net.eval().requires_grad_(False), losses


def asyrp_direction(site: str, net: DeltaH, steps: list[int], **meta) -> EditDirection:
    """The learned edit as an EditDirection: Manipulate adds alpha * f(h, t) at ``site`` in the interval
    ``steps``, by the asymmetric process."""
    return EditDirection(hidden={site: net}, hidden_steps=list(steps), asymmetric=True,
                         meta={"mode": "asyrp", "site": site, **meta})
