"""SDXL (StableDiffusionXLPipeline: UNet2DConditionModel with text-time conditioning).

The UNet family's layout (cross-attention ``attn2``, names ``down.B.A.T.cross``, hidden sites per block),
with SDXL's text: two CLIP encoders whose hidden states are concatenated along the feature axis, so both
share one sequence of positions (one stream here, tokenized by the first tokenizer: the two tokenize
alike and differ only in the padding token); the second encoder's pooled output and the size ids
(original size, crop, target size) enter through the added embedding. With an empty negative prompt the
pipeline's unconditional text is zeros (``force_zeros_for_empty_prompt``), and so is the editor's.
"""

from __future__ import annotations

import torch

from .base import Conditioning, guided
from .unet import UNetAdapter


class SDXLAdapter(UNetAdapter):
    family = "sdxl"

    def encode_prompt(self, prompt, negative_prompt="", do_cfg=True):
        if do_cfg and negative_prompt and not isinstance(prompt, str) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        pe, ne, pp, npp = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt or None)  # "" as the pipeline's default: zeros when it forces them
        return Conditioning(pe, pp, ne if do_cfg else None, npp if do_cfg else None)

    def _time_ids(self, z, rows: int) -> torch.Tensor:
        """(original size, crop top-left, target size) as the pipeline builds them for an image of z's size."""
        h, w = z.shape[-2] * self.vae_scale_factor, z.shape[-1] * self.vae_scale_factor
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=z.dtype, device=z.device).repeat(rows, 1)

    def predict(self, z, t, cond: Conditioning, guidance_scale: float = 5.0):
        cfg = cond.neg_embeds is not None and guidance_scale > 1
        zin = torch.cat([z, z]) if cfg else z
        zin = self.pipe.scheduler.scale_model_input(zin, t)
        emb = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        pooled = torch.cat([cond.neg_pooled, cond.pooled]) if cfg else cond.pooled
        added = {"text_embeds": pooled, "time_ids": self._time_ids(z, zin.shape[0])}
        out = self.denoiser(zin, t, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]
        if cfg:
            out = guided(out, guidance_scale)
        return out
