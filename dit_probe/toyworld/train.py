"""Training recipe of the toy pair, resumable stage by stage.

Stages (each skipped when its output exists, so a stopped run picks up where it stopped):
  shared  tokenizer, frozen random text encoders, and the VAE trained on renders
  data    training renders and their VAE latents (a cache, not shipped)
  mmdit   SD3Transformer2DModel, flow matching (SD3 convention: z = (1-s) x0 + s eps, target eps - x0)
  unet    UNet2DConditionModel, v-prediction on a zero-terminal-SNR schedule
  ship    assemble both pipelines with the EMA weights and save_pretrained them

Both denoisers see the same renders, the same caption dropout and the same number of steps.
Denoiser training writes a checkpoint every ``checkpoint_every`` steps (weights, EMA, optimiser,
RNG states) and appends to ``{model}-loss.csv``; a restarted run continues from the last checkpoint
and is bit-for-bit the run that was not stopped. Running again with a larger ``--steps`` extends a
finished denoiser from its last checkpoint (the cosine schedule is then that of the new total).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..io import save_torch
from ..settings import SETTINGS_FILE
from . import SHIPPED, models
from .world import ATTRIBUTES, COLORS, SHAPES, SIZES, BACKGROUNDS, Scene, caption, render, scenes, training_caption

FLOW_SHIFT = 3.0  # as SD3
UNET_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
    rescale_betas_zero_snr=True, clip_sample=False,
)  # fmt: skip


@dataclass
class TrainConfig:
    out: str = "runs/toy"
    seed: int = 0
    n_images: int = 40_000  # training renders (scene seeds 0..n_images-1 of the seed stream below)
    vae_steps: int = 700
    steps: int = 22_000  # denoiser steps, the same for both (the shipped pair: 10,000, then extended to 22,000)
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    p_attribute: float = 0.25  # each attribute word dropped with this probability
    p_caption: float = 0.1  # the whole caption dropped (classifier-free guidance)
    checkpoint_every: int = 500
    threads: int = 0  # 0: torch's default
    stop_after: int | None = None  # leave the denoiser stage after this step (resumable; for time-boxed runs)
    models: tuple = ("mmdit", "unet")


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----- shared components -----
def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(cfg: TrainConfig, shared: Path):
    vae = models.vae()
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    # one-cycle; a warm-up of at least 2 steps keeps very short (test) runs valid
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=cfg.vae_steps, pct_start=max(0.1, 2 / cfg.vae_steps))
    vae.train()
    for step in range(cfg.vae_steps):
        x = images_to_tensor(np.stack([render(s) for s in scenes(32, seed=20_000_000 + step)]))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step}/{cfg.vae_steps} mse {F.mse_loss(rec, x).item():.5f} kl/dim {kl.item():.3f}")
    vae.eval()
    # latent statistics -> shift and scale so the denoisers see unit-variance latents
    with torch.no_grad():
        x = images_to_tensor(np.stack([render(s) for s in scenes(1024, seed=30_000_000)]))
        z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    vae.save_pretrained(shared / "vae")


def stage_shared(cfg: TrainConfig, shared: Path):
    if (shared / "done").exists():
        return
    shared.mkdir(parents=True, exist_ok=True)
    tok = models.tokenizer()
    tok.save_pretrained(shared / "tokenizer")
    models.text_encoder(tok, seed=cfg.seed + 1).save_pretrained(shared / "text_encoder")
    models.text_encoder(tok, seed=cfg.seed + 2).save_pretrained(shared / "text_encoder_2")
    models.text_encoder(tok, seed=cfg.seed + 1, with_projection=False).save_pretrained(shared / "text_encoder_plain")
    train_vae(cfg, shared)
    (shared / "done").write_text("ok")


def load_shared(shared: Path) -> dict:
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(shared / "tokenizer"),
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder").eval(),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(shared / "text_encoder_2").eval(),
        "text_encoder_plain": CLIPTextModel.from_pretrained(shared / "text_encoder_plain").eval(),
        "vae": AutoencoderKL.from_pretrained(shared / "vae").eval(),
    }


def assemble(kind: str, shared: dict, denoiser):
    """A toy pipeline from the shared components and a denoiser."""
    if kind == "mmdit":
        return StableDiffusion3Pipeline(
            transformer=denoiser.eval(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
            vae=shared["vae"],
            text_encoder=shared["text_encoder"],
            tokenizer=shared["tokenizer"],
            text_encoder_2=shared["text_encoder_2"],
            tokenizer_2=shared["tokenizer"],
            text_encoder_3=None,
            tokenizer_3=None,
        )
    if kind == "unet":
        return StableDiffusionPipeline(
            unet=denoiser.eval(),
            scheduler=DDIMScheduler(**UNET_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing"),
            vae=shared["vae"],
            text_encoder=shared["text_encoder_plain"],
            tokenizer=shared["tokenizer"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    raise ValueError(f"unknown toy model kind {kind!r}: use 'mmdit' or 'unet'")


# ----- data -----
def training_scenes(cfg: TrainConfig):
    return scenes(cfg.n_images, seed=cfg.seed)


def stage_data(cfg: TrainConfig, out: Path, shared: dict):
    path = out / "data.pt"
    if path.exists():
        return torch.load(path)
    _log(f"rendering and encoding {cfg.n_images} training images")
    items = training_scenes(cfg)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(items), 500):
            post = shared["vae"].encode(images_to_tensor(np.stack([render(s) for s in items[i : i + 500]]))).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "scenes": [s.to_dict() for s in items]}
    save_torch(data, path)
    return data


def all_captions() -> list[str]:
    """Every caption the dropout can produce, and the empty one."""
    out = {""}
    for values in itertools.product(SHAPES, COLORS, SIZES, BACKGROUNDS):
        attrs = dict(zip(ATTRIBUTES, values))
        for r in range(len(ATTRIBUTES) + 1):
            for drop in itertools.combinations(ATTRIBUTES, r):
                out.add(caption(attrs, drop))
    return sorted(out)


@torch.no_grad()
def caption_embeddings(kind: str, pipe, captions: list[str]) -> dict[str, tuple]:
    """Each caption encoded by the pipeline's own encode_prompt (exactly what sampling feeds the denoiser)."""
    out = {}
    for i in range(0, len(captions), 256):
        chunk = captions[i : i + 256]
        if kind == "mmdit":
            pe, _, pooled, _ = pipe.encode_prompt(chunk, None, None, do_classifier_free_guidance=False, max_sequence_length=0)
            for c, e, p in zip(chunk, pe, pooled):
                out[c] = (e, p)
        else:
            pe, _ = pipe.encode_prompt(chunk, "cpu", 1, False)
            for c, e in zip(chunk, pe):
                out[c] = (e, None)
    return out


# ----- denoiser training -----
class EMA:
    """Exponential moving average of a model's parameters (kept as a frozen copy)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm start: short averages early on
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def _lr_lambda(warmup: int, steps: int):
    """Linear warm-up, then cosine decay to 10%."""

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine to 10%

    return f


def flow_loss(model, z0, emb, pooled, gen):
    """SD3 flow matching: sigma from a shifted logit-normal, z = (1 - s) z0 + s eps, target v = eps - z0."""
    b = z0.shape[0]
    s = torch.sigmoid(torch.randn(b, generator=gen))
    s = FLOW_SHIFT * s / (1 + (FLOW_SHIFT - 1) * s)
    eps = torch.randn(z0.shape, generator=gen)
    sv = s.view(-1, 1, 1, 1)
    zt = (1 - sv) * z0 + sv * eps
    pred = model(hidden_states=zt, timestep=s * 1000, encoder_hidden_states=emb, pooled_projections=pooled).sample
    return F.mse_loss(pred, eps - z0)


def v_loss(model, z0, emb, scheduler, gen):
    """Diffusion with v-prediction: uniform t, z = sqrt(a) z0 + sqrt(1-a) eps, target v."""
    b = z0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    zt = scheduler.add_noise(z0, eps, t)
    pred = model(zt, t, encoder_hidden_states=emb).sample
    return F.mse_loss(pred, scheduler.get_velocity(z0, eps, t))


def latents_for(kind: str, vae, mean, std, gen):
    """Sample the VAE posterior and apply the pipeline's own latent convention."""
    z = mean + std * torch.randn(mean.shape, generator=gen)
    if kind == "mmdit":  # StableDiffusion3Pipeline: (z - shift) * scale
        return (z - vae.config.shift_factor) * vae.config.scaling_factor
    return z * vae.config.scaling_factor  # StableDiffusionPipeline: z * scale


def stage_denoiser(kind: str, cfg: TrainConfig, out: Path, shared: dict, data: dict):
    final = out / f"{kind}-final.pt"
    if final.exists() and torch.load(final)["steps"] >= cfg.steps:
        return torch.load(final)
    # (a final file with fewer steps: training is being extended; it goes on from the last checkpoint
    # under the schedule of the new ``steps``)
    model = models.mmdit(cfg.seed) if kind == "mmdit" else models.unet(cfg.seed)
    model.train()
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed + (0 if kind == "mmdit" else 1))
    rng = random.Random(cfg.seed)
    start = 0
    ckpt = out / f"{kind}-checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        rng.setstate(state["rng"])
        start = state["step"]
        _log(f"{kind}: resuming at step {start}")
    pipe = assemble(kind, shared, model)
    emb = caption_embeddings(kind, pipe, all_captions())
    scheduler = DDPMScheduler(**UNET_SCHEDULE)
    items = [Scene(**s) for s in data["scenes"]]
    log_path = out / f"{kind}-loss.csv"
    if start == 0:
        log_path.write_text("step,loss,lr,seconds\n")
    else:  # drop rows logged after the checkpoint we resume from
        lines = log_path.read_text().splitlines()
        log_path.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= start]) + "\n")
    t0, running = time.time(), []
    bar = tqdm(range(start, cfg.steps), desc=kind, unit="step", initial=start, total=cfg.steps, disable=None)
    for step in bar:
        idx = torch.randint(0, len(items), (cfg.batch,), generator=gen)
        caps = [training_caption(items[i], rng, cfg.p_attribute, cfg.p_caption) for i in idx.tolist()]
        e = torch.stack([emb[c][0] for c in caps])
        z0 = latents_for(kind, shared["vae"], data["mean"][idx], data["std"][idx], gen)
        if kind == "mmdit":
            loss = flow_loss(model, z0, e, torch.stack([emb[c][1] for c in caps]), gen)
        else:
            loss = v_loss(model, z0, e, scheduler, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model, step)
        running.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 50 == 0:
            with log_path.open("a") as f:
                f.write(f"{step + 1},{np.mean(running):.5f},{sched.get_last_lr()[0]:.6f},{time.time() - t0:.1f}\n")
            if (step + 1) % 250 == 0:
                _log(f"{kind} step {step + 1}/{cfg.steps} loss {np.mean(running):.4f} ({(time.time() - t0) / len(running):.2f} s/step)")
            running, t0 = [], time.time()
        stopping = cfg.stop_after is not None and step + 1 == cfg.stop_after
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stopping:
            state = dict(model=model.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                         sched=sched.state_dict(), gen=gen.get_state(), rng=rng.getstate(), step=step + 1)  # fmt: skip
            save_torch(state, ckpt)
        if cfg.stop_after is not None and step + 1 >= cfg.stop_after and step + 1 < cfg.steps:
            _log(f"{kind}: stopping after step {step + 1} as asked; run again to resume")
            return None
    save_torch({"ema": ema.model.state_dict(), "model": model.state_dict(), "steps": cfg.steps}, final)
    return torch.load(final)


# ----- shipping -----
SAMPLING = {  # the default sampling settings of the shipped pipelines (also in their dit_probe.json)
    "mmdit": dict(num_inference_steps=25, guidance_scale=5.0, max_sequence_length=0),
    "unet": dict(num_inference_steps=25, guidance_scale=5.0),
}


def ship(kind: str, cfg: TrainConfig, out: Path, shared: dict, where: Path):
    state = torch.load(out / f"{kind}-final.pt")
    model = models.mmdit() if kind == "mmdit" else models.unet()
    model.load_state_dict(state["ema"])
    pipe = assemble(kind, shared, model)
    target = where / f"toy-{kind}"
    pipe.save_pretrained(target, safe_serialization=True)
    settings = {
        "name": f"toy-{kind}",
        "sampling": SAMPLING[kind],
        "height": 32,
        "width": 32,
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("out", "models", "stop_after", "threads")} | {"steps": state["steps"]},
        "denoiser_parameters": models.count(model),
    }
    (target / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return pipe


def run(cfg: TrainConfig, stages=("shared", "data", "mmdit", "unet", "ship"), ship_to: Path | None = None):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    shared_dir = out / "shared"
    if "shared" in stages:
        stage_shared(cfg, shared_dir)
    shared = load_shared(shared_dir)
    data = stage_data(cfg, out, shared) if any(s in stages for s in ("data", "mmdit", "unet")) else None
    finished = True
    for kind in ("mmdit", "unet"):
        if kind in stages:
            finished &= stage_denoiser(kind, cfg, out, shared, data) is not None
    if "ship" in stages and finished:
        for kind in cfg.models:
            ship(kind, cfg, out, shared, ship_to or SHIPPED)
