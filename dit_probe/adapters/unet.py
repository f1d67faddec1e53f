"""UNet families (SD2.x, SD1.x: StableDiffusionPipeline, UNet2DConditionModel).

Text enters only through cross-attention (``attn2`` of each transformer block: queries image,
keys text = the CLIP stream). ``attn1`` is image self-attention. Layer names follow the UNet:
``down.{block}.{attention}.{transformer}.cross``, ``mid.0.{t}.cross``, ``up.{block}.{attention}.{t}.cross``.
The pipeline batches CFG as [uncond | cond]. Model output is eps or v (scheduler prediction_type).
"""

from __future__ import annotations

import torch

from .base import CROSS, IMAGE_SELF, Adapter, AttentionSite, HiddenSite, Conditioning, TextStream, guided
from .ddpm import DDPMMaths


class UNetAdapter(DDPMMaths, Adapter):
    family = "unet"
    denoiser_attr = "unet"

    def _find_sites(self):
        sites = []
        for path, _ in self.denoiser.named_modules():
            parts = path.split(".")
            if parts[-1] not in ("attn1", "attn2") or "attentions" not in parts:
                continue
            # e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2
            where = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}[parts[0]]
            if where == "mid":
                block, att, tb = "0", parts[2], parts[4]
            else:
                block, att, tb = parts[1], parts[3], parts[5]
            grid_path = ".".join(parts[: parts.index("attentions") + 2])  # the Transformer2DModel: 4D input
            if parts[-1] == "attn2":
                sites.append(AttentionSite(f"{where}.{block}.{att}.{tb}.cross", path, CROSS, grid_path=grid_path))
            else:
                sites.append(AttentionSite(f"{where}.{block}.{att}.{tb}.self", path, IMAGE_SELF,
                                           "UNet self-attention (attn1): image queries and keys", grid_path=grid_path))
        order = {"down": 0, "mid": 1, "up": 2}
        return sorted(sites, key=lambda s: (order[s.name.split(".")[0]], [int(p) for p in s.name.split(".")[1:4]],
                                            s.name.endswith(".cross")))

    def hidden_sites(self):
        """Each down block's output (before its skip connections), the bottleneck (h-space) and each up block's."""
        d = self.denoiser
        out = [HiddenSite(f"down.{i}.out", f"down_blocks.{i}", part=0, layout="spatial") for i in range(len(d.down_blocks))]
        out.append(HiddenSite("mid.out", "mid_block", layout="spatial"))
        out += [HiddenSite(f"up.{i}.out", f"up_blocks.{i}", layout="spatial") for i in range(len(d.up_blocks))]
        return out

    def text_input_sites(self):
        """Each cross-attention's encoder states (the text encoder's output, the same at every layer unless changed)."""
        return [HiddenSite(s.name.removesuffix(".cross") + ".text_in", s.path, input="encoder_hidden_states")
                for s in self.sites() if s.kind == CROSS]

    def streams(self, text_len=None):
        n = text_len if text_len is not None else self.pipe.tokenizer.model_max_length
        return [TextStream("clip", self.pipe.tokenizer, 0, n)]

    def latent_input(self, call_args, call_kwargs):
        return call_kwargs.get("sample", call_args[0] if call_args else None)  # the UNet's name for it

    def image_grid(self, call_args, call_kwargs):
        x = self.latent_input(call_args, call_kwargs)
        return x.shape[-2], x.shape[-1]

    def token_grid(self, height, width):
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def layer_grid(self, site, grid):
        """Each down block but the last halves the grid, rounding up (a stride-2 convolution with padding
        1); the mid block sits at the lowest level; up block j at the level of down block (n - 1 - j)."""
        n = len(self.denoiser.config.down_block_types)
        where, block = site.name.split(".")[:2]
        level = {"down": int(block), "mid": n - 1, "up": n - 1 - int(block)}[where]
        h, w = grid
        for _ in range(level):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def encode_prompt(self, prompt, negative_prompt="", do_cfg=True):
        if do_cfg and not isinstance(prompt, str) and isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        pe, ne = self.pipe.encode_prompt(
            prompt, self.pipe.device, 1, do_cfg, negative_prompt=negative_prompt if do_cfg else None
        )
        return Conditioning(pe, None, ne if do_cfg else None, None)

    def predict(self, z, t, cond: Conditioning, guidance_scale: float = 7.5):
        cfg = cond.neg_embeds is not None and guidance_scale > 1
        zin = torch.cat([z, z]) if cfg else z
        zin = self.pipe.scheduler.scale_model_input(zin, t)
        emb = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        out = self.denoiser(zin, t, encoder_hidden_states=emb, return_dict=False)[0]
        if cfg:
            out = guided(out, guidance_scale)
        return out
