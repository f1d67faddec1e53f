"""Edit directions: what Identify finds and Manipulate applies (paper section 3.1).

An ``EditDirection`` holds, per edited image, a text-side direction n_c = z_c1 - z_c0 (sequence and
pooled embeddings; docs/design.md, section 5) and/or an image-side direction n_zt in the noised latent at
the editing timestep (HSDS, SDS, DDS or a reference image). Manipulate uses
``z~_c = z_c0 + alpha * n_c`` and ``z~_t = z_t + alpha * n_zt``. Directions save to one safetensors
file with their metadata, so studies can reuse them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapters import Conditioning
from ..io import atomic_write


@dataclass
class EditDirection:
    text_embeds: torch.Tensor | None = None  # (B, L, D): z_c1 - z_c0 of the sequence embedding
    text_pooled: torch.Tensor | None = None  # (B, P): the same for the pooled embedding (SD3, Flux)
    image: torch.Tensor | None = None  # (B, C, h, w): n_zt in the model's latent convention
    # the paper's per-alpha form: image is (B, A, C, h, w), one n_zt distilled at each of these alphas and
    # added unscaled (None: one n_zt, scaled by alpha)
    image_alphas: list[float] | None = None
    # h-space: site -> delta h per image (B, *state) or shared (1, *state), added as alpha * delta at every
    # denoising step in hidden_steps (scheduler-step indices; None: all), in both CFG branches
    # A value may also be a module f(h, t) (a learned, state-dependent delta h: ``editing.asyrp.DeltaH``),
    # added as alpha * f(h, t).
    hidden: dict[str, torch.Tensor | torch.nn.Module] = field(default_factory=dict)
    hidden_steps: list[int] | None = None
    # the asymmetric reverse process (Asyrp): delta h changes the predicted x0 only, not the predicted noise
    asymmetric: bool = False
    meta: dict = field(default_factory=dict)  # mode, prompts, phrases, strength, timestep, settings, ...

    def image_at(self, alpha: float = 1.0) -> torch.Tensor | None:
        """n_zt at one alpha, (B, C, h, w): alpha * n_zt, or the per-alpha direction distilled there."""
        if self.image is None or self.image_alphas is None:
            return None if self.image is None else alpha * self.image
        if float(alpha) not in self.image_alphas:
            raise ValueError(f"no direction was distilled at alpha {alpha}; alphas: {self.image_alphas}")
        return self.image[:, self.image_alphas.index(float(alpha))]

    def __len__(self) -> int:
        for x in (self.text_embeds, self.image):
            if x is not None:
                return x.shape[0]
        per_image = [d.shape[0] for d in self.hidden.values() if isinstance(d, torch.Tensor) and d.shape[0] > 1]
        return per_image[0] if per_image else 0  # a shared hidden direction fits any number of images

    @property
    def sides(self) -> list[str]:
        return [name for name, x in (("text", self.text_embeds), ("image", self.image), ("hidden", self.hidden or None))
                if x is not None]

    def hidden_edits(self, alphas: torch.Tensor, first_row: int, rows: int) -> dict:
        """``intervene`` edits for a chunk of Manipulate's B*A rows (row b*A + a: image b at alphas[a]) that
        starts at row ``first_row`` and holds ``rows`` rows; a CFG call stacks the chunk twice."""
        a = len(alphas)

        def edit_for(delta):
            def edit(h, call):
                g = first_row + torch.tensor(call.rows) % rows  # each selected row's place among the B*A rows
                scale = alphas.to(h.device, h.dtype)[g % a].view(-1, *([1] * (h.ndim - 1)))
                if isinstance(delta, torch.nn.Module):
                    return h + scale * delta(h, call.time)
                d = delta.to(h.device, h.dtype)
                d = d[(g // a).clamp(max=len(d) - 1)] if len(d) > 1 else d.expand(len(g), *d.shape[1:])
                return h + scale * d
            return edit

        return {site: edit_for(delta) for site, delta in self.hidden.items()}

    def apply_text(self, base: Conditioning, alphas: torch.Tensor) -> Conditioning:
        """``base`` (B rows) -> B*A rows, row b*A + a holding z_c0[b] + alphas[a] * n_c[b]."""
        a = len(alphas)
        out = base.map(lambda x: x.repeat_interleave(a, dim=0))
        if self.text_embeds is None:
            return out
        scale = alphas.repeat(len(base)).to(out.embeds.dtype)
        out.embeds = out.embeds + scale.view(-1, 1, 1) * self.text_embeds.repeat_interleave(a, dim=0).to(out.embeds)
        if self.text_pooled is not None and out.pooled is not None:
            out.pooled = out.pooled + scale.view(-1, 1) * self.text_pooled.repeat_interleave(a, dim=0).to(out.pooled)
        return out

    def apply_image(self, zt: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """``zt`` (B, ...) -> (B*A, ...) rows z_t[b] + alphas[a] * n_zt[b] (per-alpha form: + n_zt(alpha_a)[b])."""
        a = len(alphas)
        out = zt.repeat_interleave(a, dim=0)
        if self.image is None:
            return out
        if self.image_alphas is not None:
            if [float(x) for x in alphas] != self.image_alphas:
                raise ValueError(f"this direction was distilled at alphas {self.image_alphas} (the per-alpha form); "
                                 f"manipulate with those, not {[float(x) for x in alphas]}")
            return out + self.image.flatten(0, 1).to(zt)
        scale = alphas.repeat(len(zt)).to(zt.dtype).view(-1, *([1] * (zt.ndim - 1)))
        return out + scale * self.image.repeat_interleave(a, dim=0).to(zt)

    def save(self, path) -> Path:
        path = Path(path)
        tensors = {k: getattr(self, k).contiguous().cpu() for k in ("text_embeds", "text_pooled", "image")
                   if getattr(self, k) is not None}
        nets = {}
        for site, d in self.hidden.items():
            if isinstance(d, torch.nn.Module):  # a learned delta h: its weights, and how to rebuild it
                nets[site] = d.config
                tensors.update({f"hidden_net::{site}::{k}": v.contiguous().cpu() for k, v in d.state_dict().items()})
            else:
                tensors[f"hidden::{site}"] = d.contiguous().cpu()
        if not tensors:
            raise ValueError("an empty direction (no text, image or hidden side) cannot be saved")
        meta = {"dit_probe_direction": json.dumps({**self.meta, "image_alphas": self.image_alphas,
                                                   "hidden_steps": self.hidden_steps, "asymmetric": self.asymmetric,
                                                   "hidden_nets": nets}, default=str)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path) -> "EditDirection":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved direction at {path}")
        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
            if "dit_probe_direction" not in info:
                raise ValueError(f"{path} is a safetensors file but not a saved EditDirection")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(info["dit_probe_direction"])
        hidden = {k.removeprefix("hidden::"): tensors.pop(k) for k in list(tensors) if k.startswith("hidden::")}
        for site, config in meta.pop("hidden_nets", {}).items():
            from .asyrp import DeltaH  # the only kind of learned delta h

            prefix = f"hidden_net::{site}::"
            net = DeltaH(**config)
            net.load_state_dict({k.removeprefix(prefix): tensors.pop(k) for k in list(tensors) if k.startswith(prefix)})
            hidden[site] = net.eval().requires_grad_(False)
        return cls(**tensors, image_alphas=meta.pop("image_alphas", None), hidden=hidden,
                   hidden_steps=meta.pop("hidden_steps", None), asymmetric=meta.pop("asymmetric", False), meta=meta)


def text_direction(source: Conditioning, target: Conditioning) -> EditDirection:
    """n_c = z_c1 - z_c0 for the sequence and the pooled embeddings."""
    pooled = None
    if source.pooled is not None and target.pooled is not None:
        pooled = target.pooled - source.pooled
    return EditDirection(text_embeds=target.embeds - source.embeds, text_pooled=pooled)
