"""Real model architectures with random weights, built offline from the public configs shipped here.

Each folder (``sd3-medium``, ``sd3.5-medium``, ``sd3.5-large``, ``flux-dev``, ``flux-schnell``,
``sd2.1``) holds the public ``config.json`` of the model's components, laid out as on the model hub
(JSON only, no weights), and ``text_inputs.json``: the per-image shapes of the text conditioning the
denoiser receives (SD3: 77 CLIP + 256 T5 tokens of width 4096 and a 2048 pooled vector; Flux: 512
(dev) or 256 (schnell) T5 tokens and a 768 pooled vector; SD2.1: 77 OpenCLIP tokens of width 1024).

So recording, benchmarks and memory checks run at a real model's true width, depth and token counts
without a download. The weights are random (PyTorch's default initialisation, seeded): outputs are
noise, costs and shapes are real. ``layers=`` keeps only the first blocks (true width, fewer layers)
where the full depth does not fit.

    pipe = real_pipeline("sd3-medium", dtype=torch.bfloat16, device="cuda")
    with record(pipe, tokens=[5, 9]) as maps:
        pipe(**random_text_inputs("sd3-medium", batch=1), height=1024, width=1024, output_type="latent")
"""

from __future__ import annotations

import contextlib
import json
from functools import cache
from pathlib import Path

import diffusers
import torch
import transformers

ROOT = Path(__file__).parent
MODELS = tuple(sorted(p.name for p in ROOT.iterdir() if (p / "model_index.json").exists()))


def _check(name: str) -> Path:
    if name not in MODELS:
        raise KeyError(f"no shipped architecture {name!r}; shipped: {', '.join(MODELS)}")
    return ROOT / name


@cache
def _index(name: str) -> dict:
    return json.loads((_check(name) / "model_index.json").read_text())


def components(name: str) -> list[str]:
    """The pipeline components whose configs are shipped for ``name`` (e.g. transformer, scheduler, vae)."""
    return [k for k in _index(name) if not k.startswith("_") and (ROOT / name / k).is_dir()]


def denoiser_component(name: str) -> str:
    return "unet" if "unet" in _index(name) else "transformer"


def config(name: str, component: str) -> dict:
    """The public config of one component (a fresh dict: change it freely)."""
    if component not in components(name):
        raise KeyError(f"{name} has no component {component!r}; it has: {', '.join(components(name))}")
    folder = _check(name) / component
    return json.loads(next(folder.glob("*config.json")).read_text())


def _class(name: str, component: str):
    library, cls = _index(name)[component]
    return getattr({"diffusers": diffusers, "transformers": transformers}[library], cls)


def _truncated(name: str, cfg: dict, layers: int | None) -> dict:
    """Keep the first ``layers`` blocks of each kind (SD3: joint blocks; Flux: double- and single-stream)."""
    if layers is None:
        return cfg
    if denoiser_component(name) == "unet":
        raise ValueError("layers= keeps the first blocks of a transformer; a UNet's levels cannot be truncated "
                         "(sd2.1's full UNet fits in memory: build it whole)")
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    cfg = dict(cfg)
    for key in ("num_layers", "num_single_layers"):
        if key in cfg:
            cfg[key] = min(cfg[key], layers)
    return cfg


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # modules are allocated directly in the target dtype: a 12B model never exists in float32 first
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(name: str, component: str | None = None, dtype: torch.dtype = torch.float32, device="cpu",
          layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """One component (default: the denoiser) at its true size with seeded random weights.

    device='meta' allocates nothing (shapes and parameter counts only). ``layers`` keeps the first
    blocks of each kind of a transformer. Fixed buffers the model computes (SD3's sin-cos position
    table) stay in float32, as when loading real weights."""
    component = component or denoiser_component(name)
    cls = _class(name, component)
    cfg = config(name, component)
    if component == denoiser_component(name):
        cfg = _truncated(name, cfg, layers)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        if issubclass(cls, transformers.PreTrainedModel):
            model = cls(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        else:
            model = cls.from_config(cfg)
    return model.eval().requires_grad_(False)


def parameter_count(name: str, component: str | None = None, layers: int | None = None) -> int:
    """Parameters of a component, counted on the meta device (nothing is allocated)."""
    model = build(name, component, device="meta", layers=layers)
    return sum(p.numel() for p in model.parameters())


def random_text_inputs(name: str, batch: int = 1, cfg: bool | None = None, seed: int = 0, dtype=torch.float32,
                       device="cpu") -> dict[str, torch.Tensor]:
    """Pipeline keyword arguments for text conditioning of the true shapes, filled with seeded N(0, 1)
    values: ``prompt_embeds`` (and ``pooled_prompt_embeds``), and their ``negative_`` twins when
    ``cfg`` (default: when the architecture uses classifier-free guidance, i.e. not Flux)."""
    shapes = json.loads((_check(name) / "text_inputs.json").read_text())
    if cfg is None:
        cfg = _index(name)["_class_name"] != "FluxPipeline"
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in ("", "negative_") if cfg else ("",):
        for key, shape in shapes.items():
            out[prefix + key] = torch.randn(batch, *shape, generator=g).to(device, dtype)
    return out


def real_pipeline(name: str, dtype: torch.dtype = torch.float32, device="cpu", layers: int | None = None,
                  vae: bool = False, text_encoder: bool = False, seed: int = 0):
    """The model's real diffusers pipeline class around its true-size random-weight denoiser.

    Text encoders are left out (call it with ``random_text_inputs``; record token indices with
    ``tokens=[...]``), and so is the VAE unless ``vae=True`` (use ``output_type='latent'``).
    ``text_encoder=True`` (sd2.1 only) adds its OpenCLIP-H text encoder at true size and an offline
    CLIP tokenizer whose vocabulary is not the real one (words map to other ids, same shapes), so words
    can be recorded: the full pipeline in float32 is about 5 GB."""
    index = _index(name)
    parts = {c: None for c in components(name) if c not in ("scheduler",)}
    den = denoiser_component(name)
    parts[den] = build(name, den, dtype, device, layers, seed)
    if vae:
        parts["vae"] = build(name, "vae", dtype, device, seed=seed + 1)
    if text_encoder:
        if "text_encoder" not in parts:
            raise ValueError(f"{name}: only sd2.1 ships its text encoder's config; use random_text_inputs")
        from ..tiny import clip_tokenizer  # offline BPE; the real vocabulary cannot be downloaded here

        parts["text_encoder"] = build(name, "text_encoder", dtype, device, seed=seed + 2)
        parts["tokenizer"] = clip_tokenizer(model_max_length=77)
    scheduler_cfg = {k: v for k, v in config(name, "scheduler").items() if not k.startswith("_")}
    parts["scheduler"] = _class(name, "scheduler").from_config(scheduler_cfg)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    optional = {n: None for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                   "tokenizer_3", "safety_checker", "feature_extractor")}
    kwargs = {k: v for k, v in optional.items() if k in pipeline_cls.__init__.__code__.co_varnames}
    kwargs.update(parts)
    if pipeline_cls is diffusers.StableDiffusionPipeline:
        kwargs["requires_safety_checker"] = False
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
