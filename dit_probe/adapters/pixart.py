"""PixArt-alpha / PixArt-Sigma (PixArtAlphaPipeline, PixArtSigmaPipeline: PixArtTransformer2DModel): a
diffusion transformer whose text enters by cross-attention, the control that separates "transformer" from
"joint attention" in the paper's comparison.

Each transformer block has image self-attention (``attn1``, named ``block.NN.self``) and cross-attention
(``attn2``, ``block.NN.cross``: queries image, keys the T5 tokens after the caption projection, padded
tokens masked by the pipeline's attention mask). The image is one token per patch (patch 2 over the
latent), no text stream is updated. CFG is batched [uncond | cond]; the model predicts eps (and, with
learned sigma, a variance in its second half of channels, dropped here as the pipeline drops it) on a
DDPM schedule, sampled with DPM-Solver++.
"""

from __future__ import annotations

import torch

from .base import (CROSS, IMAGE_SELF, Adapter, AttentionSite, Conditioning, HiddenSite, PatchGrid, TextStream,
                   block_name, guided)
from .ddpm import DDPMMaths


class PixArtAdapter(PatchGrid, DDPMMaths, Adapter):
    family = "pixart"
    denoiser_attr = "transformer"

    def call_branches(self, call_args, call_kwargs, call_in_step):
        """[uncond | cond] when the call is a CFG call: PixArt pipelines keep no guidance attribute, but
        a CFG call's two halves are the same latents (the pipeline, like ``predict``, doubles them)."""
        x = self.latent_input(call_args, call_kwargs)
        n = x.shape[0]
        if n % 2 == 0 and torch.equal(x[: n // 2], x[n // 2:]):
            return ["uncond"] * (n // 2) + ["cond"] * (n // 2)
        return ["cond"] * n

    @property
    def default_max_sequence_length(self) -> int:
        """The pipeline's default T5 length (Sigma 300, alpha 120), unless its dit_probe settings say otherwise."""
        settings = getattr(self.pipe, "dit_probe_settings", {})
        if "max_sequence_length" in settings:
            return int(settings["max_sequence_length"])
        return 120 if type(self.pipe).__name__ == "PixArtAlphaPipeline" else 300

    def _find_sites(self):
        sites = []
        for i in range(len(self.denoiser.transformer_blocks)):
            sites.append(AttentionSite(block_name("block", i, "self"), f"transformer_blocks.{i}.attn1", IMAGE_SELF,
                                       "PixArt self-attention (attn1): image queries and keys"))
            sites.append(AttentionSite(block_name("block", i, "cross"), f"transformer_blocks.{i}.attn2", CROSS))
        return sites

    def hidden_sites(self):
        """Each block's output: the image tokens (the only stream)."""
        return [HiddenSite(block_name("block", i, "image"), f"transformer_blocks.{i}")
                for i in range(len(self.denoiser.transformer_blocks))]

    def text_input_sites(self):
        """Each cross-attention's encoder states (the caption projection's output, the same in every block)."""
        return [HiddenSite(block_name("block", i, "text_in"), f"transformer_blocks.{i}.attn2", input="encoder_hidden_states")
                for i in range(len(self.denoiser.transformer_blocks))]

    def streams(self, text_len=None):
        n = text_len if text_len is not None else self.default_max_sequence_length
        return [TextStream("t5", self.pipe.tokenizer, 0, n)]

    def encode_prompt(self, prompt, negative_prompt="", do_cfg=True, max_sequence_length=None):
        pe, pm, ne, nm = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt, device=self.pipe.device,
            clean_caption=False,
            max_sequence_length=self.default_max_sequence_length if max_sequence_length is None else max_sequence_length,
        )
        return Conditioning(pe, None, ne if do_cfg else None, None, mask=pm, neg_mask=nm if do_cfg else None)

    def predict(self, z, t, cond: Conditioning, guidance_scale: float = 4.5):
        """The model's eps prediction at (z, t) (learned sigma dropped), with CFG when cond has a negative."""
        cfg = cond.neg_embeds is not None and guidance_scale > 1
        zin = torch.cat([z, z]) if cfg else z
        zin = self.pipe.scheduler.scale_model_input(zin, t)
        emb = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        mask = torch.cat([cond.neg_mask, cond.mask]) if cfg else cond.mask
        out = self.denoiser(zin, encoder_hidden_states=emb, encoder_attention_mask=mask,
                            timestep=torch.as_tensor(t).expand(zin.shape[0]),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        if cfg:
            out = guided(out, guidance_scale)
        if out.shape[1] == 2 * z.shape[1]:  # learned sigma: the pipeline keeps the first half (eps)
            out = out.chunk(2, dim=1)[0]
        return out

