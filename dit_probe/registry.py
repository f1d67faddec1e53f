"""Model registry and ``load_pipeline``: real models by short name, local folders, tiny pipelines,
or a pipeline object passed through."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import diffusers
from diffusers.utils import logging as dlogging
from transformers.utils import logging as tlogging

from . import toyworld
from .architectures import MODELS as ARCHITECTURES
from .io import sha256
from .settings import SETTINGS_FILE, sampling_settings  # noqa: F401  (sampling_settings: re-exported)
from .tiny import T5_MAX_LENGTH, TINY, tiny_pipeline


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str
    pipeline: str  # diffusers pipeline class name
    family: str
    # the paper's settings (section 5): CFG 7.5, 50 steps, edit strength 0.75
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    strength: float = 0.75
    resolution: int = 1024
    gated: bool = False
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("sd3-medium", "stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline", "sd3", gated=True),
        ModelSpec("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", "sd3", gated=True,
                  note="dual-attention blocks (image-only attn2) in the first 13 layers"),
        ModelSpec("sd3.5-large", "stabilityai/stable-diffusion-3.5-large", "StableDiffusion3Pipeline", "sd3", gated=True),
        ModelSpec("flux-dev", "black-forest-labs/FLUX.1-dev", "FluxPipeline", "flux", gated=True,
                  note="guidance-distilled: guidance_scale is the embedded guidance, no CFG batch"),
        ModelSpec("flux-schnell", "black-forest-labs/FLUX.1-schnell", "FluxPipeline", "flux",
                  guidance_scale=0.0, num_inference_steps=4, note="timestep-distilled: 1-4 steps, no guidance"),
        ModelSpec("sd2.1", "stabilityai/stable-diffusion-2-1", "StableDiffusionPipeline", "unet", resolution=768,
                  note="v-prediction"),
        ModelSpec("sd2.1-base", "stabilityai/stable-diffusion-2-1-base", "StableDiffusionPipeline", "unet", resolution=512),
        ModelSpec("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "sdxl",
                  guidance_scale=5.0, num_inference_steps=50,
                  note="the most used UNet: two CLIP encoders, text-time conditioning; its pipeline's defaults "
                  "(CFG 5.0, 50 steps), not the paper's; its VAE overflows in float16 (decode in float32)"),
        ModelSpec("pixart-sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtSigmaPipeline", "pixart",
                  guidance_scale=4.5, num_inference_steps=20,
                  note="a DiT with cross-attention (T5, 300 tokens): the transformer-vs-joint-attention control; the "
                  "model card's sampling (CFG 4.5, 20 steps, DPM-Solver++), not the paper's"),
    ]
}


class PipelineFolderError(ValueError):
    """A local pipeline folder that cannot be read (the message names the file and what to do)."""


class WeightsUnavailableError(RuntimeError):
    pass


def _tiny_names():
    return list(TINY)


def _toy_folder(name: str) -> Path | None:
    # read from the package at call time, so a patched toyworld.SHIPPED is honoured
    return toyworld.SHIPPED / name if name in toyworld.TOY_MODELS else None


def known_names() -> list[str]:
    return list(toyworld.TOY_MODELS) + list(MODELS) + _tiny_names()


def _settings_for(name: str, pipe, folder: Path | None) -> dict:
    # PixArt pipelines clean captions with bs4 and ftfy (not dependencies here) unless told not to
    extra = {"clean_caption": False} if type(pipe).__name__.startswith("PixArt") else {}
    return {**_sampling_for(name, pipe, folder), **extra}


def _sampling_for(name: str, pipe, folder: Path | None) -> dict:
    if folder is not None and (folder / SETTINGS_FILE).exists():
        meta = json.loads((folder / SETTINGS_FILE).read_text())
        return {**meta.get("sampling", {}), "height": meta.get("height"), "width": meta.get("width")}
    if name in MODELS:
        spec = MODELS[name]
        return dict(num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                    height=spec.resolution, width=spec.resolution)  # fmt: skip
    if name in _tiny_names():
        out = dict(num_inference_steps=10, guidance_scale=4.0, height=32, width=32)
        if hasattr(pipe, "transformer"):
            out["max_sequence_length"] = T5_MAX_LENGTH
        if type(pipe).__name__.startswith("PixArt"):
            out["use_resolution_binning"] = False  # its bins are for 256 px and up; the tiny one makes 32 px
        return out
    return {}


@lru_cache(maxsize=None)
def model_identity(name: str) -> str:
    """What a cached result computed with this model depends on: the weights' checksums of a shipped toy
    model or a local folder (so retrained weights never reuse old results), else the name (a hub id or a
    tiny pipeline, which is built from a fixed seed)."""
    folder = _toy_folder(name) or (Path(name) if Path(name).is_dir() else None)
    if folder is None:
        return MODELS[name].hub_id if name in MODELS else name

    def digest(p: Path) -> str:  # real checkpoints are GBs: their size and time stand in for a checksum
        st = p.stat()
        return sha256(p) if st.st_size < 64 << 20 else f"{st.st_size}:{st.st_mtime_ns}"

    digests = [f"{p.relative_to(folder)}:{digest(p)}" for p in sorted(folder.rglob("*"))
               if p.suffix in (".safetensors", ".bin", ".json") and p.name != "quality.json"]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def load_pipeline(name_or_path, torch_dtype=None, device=None, **kwargs):
    """A diffusers pipeline from a registry name, a tiny-pipeline name, a local folder, or a pipeline.

    Registry names load from the Hugging Face hub cache or the hub (gated models need
    ``huggingface-cli login`` or HF_TOKEN and accepting the licence on the model page). Offline, put the
    weights in a folder (``huggingface-cli download <hub id> --local-dir DIR``) and pass the folder.
    """
    if not isinstance(name_or_path, (str, Path)):
        if hasattr(name_or_path, "components"):
            return name_or_path  # a pipeline object passes through
        raise TypeError(f"load_pipeline takes a name, a folder or a pipeline, not {type(name_or_path).__name__}")
    name = str(name_or_path)
    folder = _toy_folder(name) or (Path(name) if Path(name).is_dir() else None)
    if name in _tiny_names():
        pipe = tiny_pipeline(name)
    elif folder is not None:
        if not (folder / "model_index.json").exists() and _toy_folder(name):
            raise FileNotFoundError(
                f"the shipped {name} weights are missing from {folder}: reinstall dit_probe, or rebuild them "
                "with `dit-probe train-toy` (see the model card)"
            )
        cls, absent = _pipeline_class_of(folder)
        # components saved as null (toy-mmdit has no T5) must be passed as None explicitly
        pipe = _from_pretrained(cls, str(folder), torch_dtype, **{**{k: None for k in absent}, **kwargs})
    elif name in MODELS:
        spec = MODELS[name]
        pipe = _from_pretrained(getattr(diffusers, spec.pipeline), spec.hub_id, torch_dtype, spec=spec, **kwargs)
    else:
        raise KeyError(
            f"unknown model {name!r}: not a registry name, a tiny pipeline, or an existing folder. "
            f"Known names: {', '.join(known_names())}"
        )
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.dit_probe_settings = _settings_for(name, pipe, folder)
    return pipe


def _pipeline_class_of(folder: Path):
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineFolderError(f"{index} is not valid JSON ({err}): restore it from the pipeline's source "
                                  "(re-download or re-save the pipeline)") from None
    cls = getattr(diffusers, meta.get("_class_name", "") if isinstance(meta, dict) else "", None)
    if cls is None:
        got = meta.get("_class_name") if isinstance(meta, dict) else None
        raise PipelineFolderError(f"{index} names no diffusers pipeline class (_class_name: {got!r}): restore it from "
                                  "the pipeline's source (re-download or re-save the pipeline)")
    absent = [k for k, v in meta.items() if isinstance(v, list) and v == [None, None]]
    return cls, absent


@contextlib.contextmanager
def _quiet_loading():
    """No 'Loading pipeline components' / 'Loading weights' bars while a pipeline loads (restored after)."""
    was = dlogging.is_progress_bar_enabled(), tlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlogging.enable_progress_bar()
        if was[1]:
            tlogging.enable_progress_bar()


def _from_pretrained(cls, where, torch_dtype, spec: ModelSpec | None = None, **kwargs):
    try:
        with _quiet_loading():
            return cls.from_pretrained(where, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:  # hub client / missing files
        if spec is None:
            raise
        how = (
            "It is gated: accept its licence on the model page, then `huggingface-cli login` (or set HF_TOKEN). "
            if spec.gated
            else ""
        )
        raise WeightsUnavailableError(
            f"could not load {spec.name} ({spec.hub_id}) from the hub or its cache: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}\n{how}Offline, download the weights on a machine with access "
            f"(`huggingface-cli download {spec.hub_id} --local-dir DIR`) and pass DIR to load_pipeline; "
            "without weights, the tiny pipelines (tiny-sd3, tiny-sd3.5, tiny-flux, tiny-unet) run every code path"
            + (f", and dit_probe.architectures.real_pipeline({spec.name!r}) builds its true-size architecture with "
               "random weights (for costs and shapes; its images are noise)." if spec.name in ARCHITECTURES else ".")
        ) from None
