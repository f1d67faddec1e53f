"""Aggregation presets: how a tool turns the raw maps (per layer, step, head and token) into one heat map
of a word. Pure functions of a recording (``record``); nothing here touches a model.

- ``default``: ``AttentionMaps.word_map``: the word's pieces summed, heads averaged (as recorded with
  heads='mean'), every layer bilinearly resized to the largest grid, the mean over layers and steps.
  Probabilities of the softmax as they are (joint softmax for DiTs; ``normalise='text'`` for the share of
  text attention).
- ``daam``: DAAM 0.2.0's recipe for UNets (Tang et al., 2023; its ``trace.compute_global_heat_map`` and
  ``WordHeatMap.expand_as``), step by step:
  1. layers: every cross-attention (attn2) of the up and down blocks, not the mid block, whose "factor"
     int(sqrt(latent_hw // its query count)) is 0, 1, 2, 4, 16, 32 or 64 (8 is skipped while tracing, other
     values are not among the factors ``compute_global_heat_map`` aggregates), where latent_hw is 4096 if
     ``unet.config.sample_size * vae_scale_factor`` is 512 or 1024 and 9216 otherwise;
  2. the conditional half of the batch, every head and token kept; summed (not averaged) over steps;
  3. each (layer, head) map of every token: bicubic to sqrt(latent_hw) squared, clamped at 0;
  4. the mean over all (layer, head) maps (so a layer counts with its number of heads);
  5. the word: the mean over its tokens (every occurrence of its pieces in the prompt);
  6. shown on the image: bicubic to the image size and min-max normalised (``expand_as``).
  Exact against DAAM 0.2.0 itself: ``benchmarks/daam_parity`` (DAAM needs diffusers 0.21, so it runs in a
  separate environment; docs/localisation.md says how).
- ``paper``: the maps the EIM paper's probes read (section 5.1; our ``probing`` study): per layer and step,
  the word's map resized to a common grid and divided by its sum; the preset returns their mean over the
  recorded layers and steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .maps import AttentionMaps

PRESETS = ("default", "daam", "paper")


def daam_latent_hw(pipe) -> int:
    """DAAM 0.2.0's latent size (query count of a full-resolution layer), read from the UNet's config."""
    h = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return 4096 if h in (512, 1024) else 9216


DAAM_FACTORS = {0, 1, 2, 4, 16, 32, 64}  # compute_global_heat_map's {0, 1, 2, 4, 8, ..., 64}, less 8 (never traced)


def daam_layers(maps: AttentionMaps, latent_hw: int) -> list[str]:
    """The recorded layers DAAM aggregates: up and down cross-attention at the factors it keeps."""
    out = []
    for name in maps.layers:
        h, w = maps.grids[name]
        if name.split(".")[0] in ("up", "down") and name.endswith(".cross") and int(math.sqrt(latent_hw // (h * w))) in DAAM_FACTORS:
            out.append(name)
    return out


def daam_heat_maps(maps: AttentionMaps, tokens: list, latent_hw: int, batch: int = 0) -> torch.Tensor:
    """DAAM's global heat maps of ``tokens`` (labels recorded with ``record(..., heads='keep')``: token
    positions, or words): (len(tokens), x, x) with x = sqrt(latent_hw); steps 1-4 of the recipe above.
    ``latent_hw``: DAAM's own rule is ``daam_latent_hw(pipe)``; the latent's real size applies the recipe to a
    model DAAM does not size right (a toy model: its factors would not be powers of two)."""
    if maps.heads_mode != "keep":
        raise ValueError("DAAM aggregates every head: record with heads='keep'")
    x = math.isqrt(latent_hw)
    merged = []
    for name in daam_layers(maps, latent_hw):
        t = maps.tensor(word=list(tokens), layer=name, branch="cond")[:, 0, 0, batch]  # (step, head, token, h, w)
        summed = t.sum(0)  # over steps
        for head in summed:  # (token, h, w)
            up = F.interpolate(head.unsqueeze(1), size=(x, x), mode="bicubic").clamp_(min=0)
            merged.append(up)
    if not merged:
        raise ValueError("no layer DAAM aggregates was recorded (up/down cross-attention layers)")
    return torch.stack(merged).mean(0)[:, 0]


def daam(maps: AttentionMaps, tokens: list[int], latent_hw: int, image_size: tuple[int, int] | None = None,
         batch: int = 0) -> torch.Tensor:
    """DAAM's heat map of a word whose pieces are ``tokens``: the mean of their global heat maps; with
    ``image_size`` (height, width), as DAAM shows it on the image (bicubic, min-max normalised)."""
    word = daam_heat_maps(maps, tokens, latent_hw, batch).mean(0)
    if image_size is None:
        return word
    im = F.interpolate(word[None, None], size=tuple(image_size), mode="bicubic")
    return ((im - im.min()) / (im.max() - im.min() + 1e-8))[0, 0]


def paper(maps: AttentionMaps, word, grid: tuple[int, int] = (32, 32), batch: int = 0) -> torch.Tensor:
    """The probing features' mean: per layer and step the word's map on ``grid`` divided by its sum."""
    t = maps.tensor(word=word, branch="cond", grid=tuple(grid))[:, :, 0, batch].mean(2)[:, :, 0]  # (step, layer, h, w)
    t = t / t.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return t.mean(dim=(0, 1))


def default(maps: AttentionMaps, word, batch: int = 0, normalise=None) -> torch.Tensor:
    return maps.word_map(word, batch=batch, normalise=normalise)
