"""The EIM editor (paper section 3.1): Encode, Identify, Manipulate.

    editor = EIMEditor(load_pipeline("toy-mmdit"))
    result = editor.edit(image, "a large red star on a white background",
                         "a large blue star on a white background", alphas=[0, 0.5, 1, 1.5])
    result.images  # (images, alphas, H, W, 3) uint8

- Encode: the image through the VAE, forwarded to the editing strength s with a fixed noise sample
  (``seed``); the source prompt encoded as z_c0 (and the empty prompt for CFG).
- Identify: the text direction n_c = z_c1 - z_c0 and an image direction n_zt at the timestep of s
  (HSDS, SDS, DDS, or a reference image encoded with the same noise). Done once per image.
- Manipulate: for every alpha, z~_c = z_c0 + alpha n_c and z~_t = z_t + alpha n_zt, denoised from s
  and decoded; all alphas of all images run as one batch (``batch_size`` rows at a time).
Modes pick the sides: eim (text + HSDS), prompt-only (text), hsds-only (HSDS), reference (reference
image), text+reference (text + reference image: the oracle where the target image is known), sds / dds
(text + that image direction: the baselines of Fig. 12). Negative alpha edits backwards.
Everything model-specific goes through the adapter, so the same code edits SD3, SD3.5, Flux and UNets.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import Conditioning, get_adapter
from ..adapters.base import check_strength, ensure_prompts
from ..hidden import intervene
from ..settings import sampling_settings
from .directions import EditDirection, text_direction
from .distillation import DistillSettings, dds, hsds, sds

# mode -> (text side, image-side method)
MODES = {
    "eim": (True, "hsds"),
    "prompt-only": (True, None),
    "hsds-only": (False, "hsds"),
    "reference": (False, "reference"),
    "text+reference": (True, "reference"),  # the oracle ceiling where the target image is known
    "sds": (True, "sds"),
    "dds": (True, "dds"),
}


ALPHA_WARN = 5.0  # |alpha| beyond this draws a warning: the studies sweep alpha within [-3, 3]


class EditInputError(ValueError):
    """An edit request that cannot be carried out as given."""


@dataclass
class Encoded:
    """Encode's output for a batch of B images (latents in the model's 4D convention)."""

    z0: torch.Tensor
    zt: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor  # the editing timestep (the first of ``timesteps``)
    timesteps: torch.Tensor
    prompts: list[str]
    cond: Conditioning
    seeds: list[int]

    def __len__(self):
        return self.z0.shape[0]


@dataclass
class EditResult:
    images: np.ndarray  # (B, A, H, W, 3) uint8
    alphas: list[float]
    direction: EditDirection
    meta: dict = field(default_factory=dict)


def target_phrase(source: str, target: str) -> str:
    """The words of ``target`` that are not in ``source`` (inserted or replaced), e.g. 'blue' for
    'a red star' -> 'a blue star': the default z_s of HSDS / SDS."""
    a, b = source.split(), target.split()
    words = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "insert"):
            words += b[j1:j2]
    if not words:
        raise EditInputError(
            f"the target {target!r} adds no word to the source {source!r}, so there is no target phrase: "
            "pass target_phrase=... (the edited attribute alone, e.g. 'purple coat')"
        )
    return " ".join(words)


class EIMEditor:
    def __init__(self, pipe, strength: float = 0.75, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, distill: DistillSettings | None = None,
                 resize: str = "warn", batch_size: int | None = None):
        """pipe: any supported pipeline (``load_pipeline``); its default steps and guidance apply unless given
        (the paper: 50 steps, CFG 7.5, strength 0.75). resize: 'warn' (resize a wrong-size image and warn)
        or 'error'. batch_size: most rows per denoiser call in Manipulate (None: all)."""
        check_strength(strength)
        if resize not in ("warn", "error"):
            raise ValueError(f"resize must be 'warn' or 'error', got {resize!r}")
        self.pipe, self.adapter = pipe, get_adapter(pipe)
        settings = sampling_settings(pipe)
        self.strength = float(strength)
        self.num_inference_steps = int(num_inference_steps or settings.get("num_inference_steps") or 50)
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else settings.get("guidance_scale", 7.5))
        self.distill = distill or DistillSettings()
        self.distill.check()
        self.resize, self.batch_size = resize, batch_size
        self.size = self.adapter.default_image_size()
        self._prompt_kwargs = {k: settings[k] for k in ("max_sequence_length",) if k in settings}
        self.forward_passes = 0  # rows through the denoiser since the last reset (benchmarks)

    # ----- helpers -----
    @property
    def _cfg(self) -> bool:
        return self.adapter.classifier_free_guidance and self.guidance_scale > 1

    def _encode_prompts(self, prompts) -> Conditioning:
        return self.adapter.encode_prompt(list(prompts), negative_prompt="", do_cfg=self._cfg, **self._prompt_kwargs)

    def _predict(self, z, t, cond, guidance):
        rows = z.shape[0] * (2 if (self.adapter.classifier_free_guidance and cond.neg_embeds is not None
                                   and guidance > 1) else 1)
        self.forward_passes += rows
        return self.adapter.predict(z, t, cond, guidance_scale=guidance)

    def _eps_at(self, t):
        # cfg=False: the conditional branch alone (guidance 1). Embedded guidance (Flux-dev) is not CFG, so it
        # keeps the model's value either way: 1.0 would be a different, undistilled operating point.
        cfg_batch = self.adapter.classifier_free_guidance
        guidance = self.guidance_scale if (self.distill.cfg or not cfg_batch) else 1.0

        def eps(z, cond):
            return self.adapter.to_eps(self._predict(z, t, cond, guidance), z, t)

        return eps

    def pixels(self, images) -> torch.Tensor:
        """Images (PIL, HxWx3 uint8 / float arrays, or a (B, 3, H, W) tensor in [0, 1]) -> (B, 3, S, S) in [-1, 1]."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            x = images.float()
        else:
            items = images if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4) else [images]
            arrays = []
            for im in items:
                mode = getattr(im, "mode", "RGB")
                if mode != "RGB":  # a valid input, but not what it looks like once converted: say so
                    lost = "; its transparency is dropped (the colour channels are kept as they are)" if "A" in mode or "transparency" in getattr(im, "info", {}) else ""
                    warnings.warn(f"the image is in PIL mode {mode!r}, converted to RGB{lost}", stacklevel=3)
                a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
                if a.ndim != 3 or a.shape[-1] != 3:
                    raise EditInputError(f"an image must be H x W x 3 RGB; got an array of shape {a.shape}")
                arrays.append(torch.from_numpy(a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)))
            shapes = {tuple(a.shape) for a in arrays}
            if len(shapes) > 1:
                raise EditInputError(f"the images have different sizes {sorted(shapes)}: edit them separately")
            x = torch.stack(arrays).permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise EditInputError(f"image tensors must be (B, 3, H, W); got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            msg = f"the image is {h}x{w} but the model works at {self.size}x{self.size}"
            if self.resize == "error":
                raise EditInputError(msg + ": resize it first, or use resize='warn'")
            warnings.warn(msg + "; resizing it (the edit is at the model's resolution)", stacklevel=3)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x.clamp(0, 1) * 2 - 1).to(self.pipe.device)

    @staticmethod
    def _alphas(alphas) -> torch.Tensor:
        values = [float(a) for a in (alphas if isinstance(alphas, (list, tuple, np.ndarray, torch.Tensor)) else [alphas])]
        if not values:
            raise EditInputError("give at least one alpha")
        bad = [a for a in values if not math.isfinite(a)]
        if bad:
            raise EditInputError(f"alpha must be a finite number; got {bad}")
        far = [a for a in values if abs(a) > ALPHA_WARN]
        if far:
            warnings.warn(f"alpha {far} is far outside the range edits are made and measured in (|alpha| <= "
                          f"{ALPHA_WARN:g}; alpha 1 is the full step from source to target): expect an image off the "
                          "model's manifold", stacklevel=3)
        return torch.tensor(values, dtype=torch.float32)

    # ----- Encode -----
    @torch.no_grad()
    def encode(self, images, prompts, seeds=0) -> Encoded:
        """VAE-encode, forward to the editing strength with a fixed noise sample per image, encode the prompts."""
        x = self.pixels(images)
        prompts = list(ensure_prompts(prompts))
        if len(prompts) == 1 and len(x) > 1:
            prompts = prompts * len(x)
        if len(prompts) != len(x):
            raise EditInputError(f"{len(x)} images but {len(prompts)} source prompts: give one per image")
        seeds = [int(seeds)] * len(x) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if len(seeds) != len(x):
            raise EditInputError(f"{len(x)} images but {len(seeds)} seeds")
        z0 = self.adapter.encode_image(x)
        timesteps = self.adapter.set_timesteps(self.num_inference_steps, self.strength, latents=z0)
        if len(timesteps) == 0:
            raise EditInputError(f"strength {self.strength} with {self.num_inference_steps} steps leaves no step to denoise")
        t = timesteps[0]
        noise = torch.stack([torch.randn(z0.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        noise = noise.to(z0)
        zt = self.adapter.add_noise(z0, noise, t)
        return Encoded(z0, zt, noise, t, timesteps, prompts, self._encode_prompts(prompts), seeds)

    # ----- Identify -----
    @torch.no_grad()
    def identify(self, enc: Encoded, targets=None, mode: str = "eim", phrases=None, reference=None,
                 alphas=None) -> EditDirection:
        """The edit direction(s) for the encoded images (one per image). ``alphas``: needed by HSDS in the
        per-alpha form (``distill.alpha_form``), which distils one image direction per alpha."""
        if mode not in MODES:
            raise EditInputError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        text_side, method = MODES[mode]
        meta = {"mode": mode, "family": self.adapter.family, "sources": enc.prompts, "strength": self.strength,
                "timestep": float(enc.t), "steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "seeds": enc.seeds}
        if method == "reference" and reference is None:
            raise EditInputError(f"mode {mode!r} needs reference=... (the image showing the target attribute)")
        direction = EditDirection()
        if text_side or method != "reference":  # a text side, or a distillation that needs the target prompt
            if targets is None:
                raise EditInputError(f"mode {mode!r} needs target prompts")
            targets = list(ensure_prompts(targets))
            targets = targets * len(enc) if len(targets) == 1 else targets
            if len(targets) != len(enc):
                raise EditInputError(f"{len(enc)} images but {len(targets)} target prompts")
            same = [s for s, t in zip(enc.prompts, targets) if s.strip() == t.strip()]
            if same:
                raise EditInputError(f"source and target prompts do not differ ({same[0]!r}): the target must "
                                     "describe the edited image, e.g. 'a red car' -> 'a blue car'")
            cond1 = self._encode_prompts(targets)
            direction = text_direction(enc.cond, cond1)
            meta["targets"] = targets
        if method == "reference":
            direction.image = self.reference_direction(enc, reference)
        elif method is not None:
            meta["distill"] = self.distill.as_dict()
            eps = self._eps_at(enc.t)
            if method in ("hsds", "sds"):
                if phrases is None:
                    phrases = [target_phrase(s, t) for s, t in zip(enc.prompts, targets)]
                phrases = list(ensure_prompts(phrases))
                phrases = phrases * len(enc) if len(phrases) == 1 else phrases
                if len(phrases) != len(enc):
                    raise EditInputError(f"{len(enc)} images but {len(phrases)} target phrases")
                meta["phrases"] = phrases
                c_s = self._encode_prompts(phrases)
            if method == "hsds" and self.distill.alpha_form == "per-alpha":
                if alphas is None:
                    raise EditInputError("the per-alpha HSDS form distils one direction per alpha: pass alphas=...")
                direction.image_alphas = self._alphas(alphas).tolist()
                image = torch.stack([hsds(eps, enc.zt, direction.apply_text(enc.cond, torch.tensor([a])), c_s,
                                          self.distill) for a in direction.image_alphas], dim=1)
            elif method == "hsds":
                image = hsds(eps, enc.zt, cond1, c_s, self.distill)
            elif method == "sds":
                image = sds(eps, enc.zt, c_s, enc.noise, self.distill)
            else:
                image = dds(eps, enc.zt, cond1, enc.cond, self.distill)
            direction.image = image
        if not text_side:
            direction.text_embeds = direction.text_pooled = None
        direction.meta = meta
        return direction

    @torch.no_grad()
    def reference_direction(self, enc: Encoded, reference) -> torch.Tensor:
        """n_ref: the reference (target) image encoded and noised at the same timestep with the same noise,
        minus z_t. Where the target image is known this is the true image direction: the oracle that the
        distilled directions are compared with (``cos(n_zt, n_ref)``)."""
        zref = self.adapter.add_noise(self.adapter.encode_image(self.pixels(reference)), enc.noise, enc.t)
        if zref.shape != enc.zt.shape:
            raise EditInputError(f"{len(zref)} reference images for {len(enc)} source images: give one per image")
        return zref - enc.zt

    # ----- Manipulate -----
    @torch.no_grad()
    def manipulate(self, enc: Encoded, direction: EditDirection, alphas) -> np.ndarray:
        """Denoise z_t + alpha n_zt under z_c0 + alpha n_c from the editing strength, for every alpha.
        Returns uint8 images (B, A, H, W, 3). alpha 0 is the plain reconstruction of the source."""
        a = self._alphas(alphas)
        if len(direction) not in (0, len(enc)):
            raise EditInputError(f"the direction is for {len(direction)} images, the encoding has {len(enc)}")
        z = direction.apply_image(enc.zt, a)
        cond = direction.apply_text(enc.cond, a)
        rows = self.batch_size or len(z)
        out = []
        for lo in range(0, len(z), rows):
            zi, ci = z[lo:lo + rows], cond.map(lambda x, lo=lo: x[lo:lo + rows])
            timesteps = self.adapter.set_timesteps(self.num_inference_steps, self.strength, latents=zi)
            hidden = contextlib.nullcontext
            if direction.hidden:  # h-space: alpha * delta h added inside the denoiser, both CFG branches
                def hidden(chunk=len(zi), lo=lo):
                    return intervene(self.pipe, direction.hidden_edits(a, lo, chunk), steps=direction.hidden_steps,
                                     branch="both")
            if direction.asymmetric:
                zi = self._asymmetric(zi, ci, timesteps, hidden, direction.hidden_steps)
            else:
                with hidden():
                    for t in timesteps:
                        zi = self.adapter.step(self._predict(zi, t, ci, self.guidance_scale), t, zi)
            out.append(self.adapter.decode_latents(zi))
        x = torch.cat(out)
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return images.reshape(len(enc), len(a), *images.shape[1:])

    def _asymmetric(self, z, cond, timesteps, hidden, steps):
        """Asyrp's reverse process (``editing.asyrp``): at the edited steps, x0 predicted with the edit and
        the noise without it, z' = step(plain) + a' (x0~ - x0); elsewhere the plain step."""
        n = len(self.pipe.scheduler.timesteps)
        first = n - len(timesteps)
        edited = None if steps is None else {int(s) % n for s in steps}
        for i, t in enumerate(timesteps):
            plain = self._predict(z, t, cond, self.guidance_scale)
            if edited is not None and first + i not in edited:
                z = self.adapter.step(plain, t, z)
                continue
            with hidden():
                x0e = self.adapter.to_x0(self._predict(z, t, cond, self.guidance_scale), z, t)
            shift = self.adapter.next_signal_scale(t) * (x0e - self.adapter.to_x0(plain, z, t))
            z = self.adapter.step(plain, t, z) + shift
        return z

    # ----- plain reconstruction: h(f(x, t), c, t) -----
    @torch.no_grad()
    def reconstruct(self, enc: Encoded, prompts=None) -> np.ndarray:
        """Denoise the encoded latents from the editing strength under ``prompts`` (default: the source
        prompts) and decode: uint8 (B, H, W, 3). The noised latent is the one ``encode`` made, so two calls
        with different prompts share the forward noise (the semantic-loss sweep and SDE rely on it)."""
        if prompts is not None:
            prompts = list(ensure_prompts(prompts))
            prompts = prompts * len(enc) if len(prompts) == 1 else prompts
            if len(prompts) != len(enc):
                raise EditInputError(f"{len(enc)} encoded images but {len(prompts)} prompts")
            enc = Encoded(enc.z0, enc.zt, enc.noise, enc.t, enc.timesteps, prompts, self._encode_prompts(prompts),
                          enc.seeds)
        return self.manipulate(enc, EditDirection(), [0.0])[:, 0]

    # ----- all three -----
    def edit(self, images, source, target=None, alphas=(0.0, 0.5, 1.0, 1.5), mode: str = "eim", seed=0,
             phrase=None, reference=None) -> EditResult:
        """Encode, Identify and Manipulate in one call; the alphas share the encoding and the direction."""
        a = self._alphas(alphas)  # bad alphas fail before any model work
        enc = self.encode(images, source, seed)
        direction = self.identify(enc, target, mode, phrase, reference, alphas=a.tolist())
        return EditResult(self.manipulate(enc, direction, a), a.tolist(), direction, dict(direction.meta))
