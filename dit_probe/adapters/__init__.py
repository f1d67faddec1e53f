"""Model adapters: the only place that knows an architecture. ``get_adapter(pipe)`` picks one."""

from __future__ import annotations

from .base import Adapter, AttentionSite, Conditioning, StreamTokens, TextStream, locate_word
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter
from .unet import UNetAdapter

_BY_DENOISER = {
    "SD3Transformer2DModel": SD3Adapter,
    "FluxTransformer2DModel": FluxAdapter,
    "UNet2DConditionModel": UNetAdapter,
    "PixArtTransformer2DModel": PixArtAdapter,
}


def get_adapter(pipe) -> Adapter:
    """The adapter for a diffusers pipeline, chosen by its denoiser's class."""
    if isinstance(pipe, Adapter):
        return pipe
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    name = type(denoiser).__name__
    if name not in _BY_DENOISER:
        raise TypeError(
            f"no dit_probe adapter for a pipeline whose denoiser is {name!r}; supported denoisers: "
            + ", ".join(_BY_DENOISER)
        )
    if name == "UNet2DConditionModel" and getattr(pipe, "text_encoder_2", None) is not None:
        return SDXLAdapter(pipe)  # SDXL: the UNet class, two text encoders and text-time conditioning
    return _BY_DENOISER[name](pipe)


__all__ = ["Adapter", "AttentionSite", "Conditioning", "StreamTokens", "TextStream", "get_adapter", "locate_word", "SD3Adapter", "FluxAdapter", "PixArtAdapter", "SDXLAdapter", "UNetAdapter"]
