"""Flux (FluxPipeline, FluxTransformer2DModel).

Double-stream blocks see [text | image] with RoPE on both; single-stream blocks receive the
concatenation [text | image] as one sequence, so their attention processor never sees the text
length: the recorder takes it from the transformer call. Text is the T5 stream only (CLIP gives
the pooled vector). FluxPipeline runs true CFG as two transformer calls per step, cond first.
Latents are packed 2x2 into tokens; the grid comes from ``img_ids``.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import (
    JOINT_TEXT_IMAGE,
    SINGLE_TEXT_IMAGE,
    Adapter,
    AttentionSite,
    Conditioning,
    HiddenSite,
    TextStream,
    block_name,
    check_strength,
    concept_attention,
)
from .flow import FlowMatchingMaths


class FluxAdapter(FlowMatchingMaths, Adapter):
    family = "flux"
    denoiser_attr = "transformer"
    default_max_sequence_length = 512
    classifier_free_guidance = False  # FLUX.1-dev is guidance-distilled: guidance_scale is an input

    def _find_sites(self):
        sites = [
            AttentionSite(block_name("double", i, "joint"), f"transformer_blocks.{i}.attn", JOINT_TEXT_IMAGE)
            for i in range(len(self.denoiser.transformer_blocks))
        ]
        sites += [
            AttentionSite(
                block_name("single", i, "joint"),
                f"single_transformer_blocks.{i}.attn",
                SINGLE_TEXT_IMAGE,
                "single-stream block",
            )
            for i in range(len(self.denoiser.single_transformer_blocks))
        ]
        return sites

    def hidden_sites(self):
        """Every block's text and image outputs; single-stream blocks return them split, as double ones do."""
        out = []
        for kind, blocks in (("double", "transformer_blocks"), ("single", "single_transformer_blocks")):
            for i in range(len(getattr(self.denoiser, blocks))):
                out.append(HiddenSite(block_name(kind, i, "image"), f"{blocks}.{i}", part=1))
                out.append(HiddenSite(block_name(kind, i, "text"), f"{blocks}.{i}", part=0))
        return out

    def text_input_sites(self):
        return [HiddenSite(block_name(kind, i, "text_in"), f"{blocks}.{i}", input="encoder_hidden_states")
                for kind, blocks in (("double", "transformer_blocks"), ("single", "single_transformer_blocks"))
                for i in range(len(getattr(self.denoiser, blocks)))]

    def attention_output_weight(self, site):
        """Single-stream blocks have no attention output projection: the attention output is concatenated
        with the MLP's and projected by the block's proj_out, whose first columns take it."""
        if site.kind != SINGLE_TEXT_IMAGE:
            return super().attention_output_weight(site)
        block = self.denoiser.get_submodule(site.path.removesuffix(".attn"))
        return block.proj_out.weight[:, : block.attn.inner_dim]

    # ----- ConceptAttention (attention.concepts) -----
    def concept_blocks(self):
        """(name, block, taps) of every double- then single-stream block. Double blocks: the image
        projections and the image attention output (the input of to_out); single blocks project and attend
        over [text | image] at once, so their taps hold the whole sequence (the image part is taken later)."""
        out = []
        for i, b in enumerate(self.denoiser.transformer_blocks):
            out.append((block_name("double", i, "joint"), b, {"q": (b.attn.to_q, "out"), "k": (b.attn.to_k, "out"),
                                                              "v": (b.attn.to_v, "out"), "o": (b.attn.to_out[0], "in")}))
        for i, b in enumerate(self.denoiser.single_transformer_blocks):
            out.append((block_name("single", i, "joint"), b, {"q": (b.attn.to_q, "out"), "k": (b.attn.to_k, "out"),
                                                              "v": (b.attn.to_v, "out"), "o": (b.attn, "out")}))
        return out

    def concept_block(self, name, block, c, kwargs, image):
        """A Flux block's text side applied to the concept tokens (``SD3Adapter.concept_block`` says what the
        maps are). Image queries and keys are rotated as the block rotates them; concept tokens sit at text
        position 0, where the rotation is the identity, so they are left as they are."""
        from diffusers.models.embeddings import apply_rotary_emb

        attn, temb, rope = block.attn, kwargs["temb"], kwargs.get("image_rotary_emb")
        single = name.startswith("single")
        n_txt = kwargs["encoder_hidden_states"].shape[1]
        sl = slice(n_txt, None) if single else slice(None)  # the image part of what the taps saw

        def heads(x, norm=None):
            x = x.unflatten(-1, (-1, attn.head_dim))
            return norm(x) if norm is not None else x

        qx, kx, vx = heads(image["q"][:, sl], attn.norm_q), heads(image["k"][:, sl], attn.norm_k), heads(image["v"][:, sl])
        if rope is not None:
            n_img = qx.shape[1]
            img_rope = tuple(r[-n_img:] for r in rope)
            qx, kx = (apply_rotary_emb(x, img_rope, sequence_dim=1) for x in (qx, kx))
        if single:
            norm_c, gate = block.norm(c, emb=temb)
            qc, kc, vc = heads(attn.to_q(norm_c), attn.norm_q), heads(attn.to_k(norm_c), attn.norm_k), heads(attn.to_v(norm_c))
        else:
            norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)
            qc = heads(attn.add_q_proj(norm_c), attn.norm_added_q)
            kc = heads(attn.add_k_proj(norm_c), attn.norm_added_k)
            vc = heads(attn.add_v_proj(norm_c))
        t = lambda x: x.transpose(1, 2)  # noqa: E731 (rows, tokens, heads, dim) -> (rows, heads, tokens, dim)
        oc, out_map, prob_map = concept_attention(t(qx), t(kx), t(vx), image["o"][:, sl], t(qc), t(kc), t(vc))
        if single:
            c = c + gate.unsqueeze(1) * block.proj_out(torch.cat([oc, block.act_mlp(block.proj_mlp(norm_c))], 2))
        else:
            c = c + gate_msa.unsqueeze(1) * attn.to_add_out(oc)
            normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            c = c + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        return out_map, prob_map, c

    def streams(self, text_len=None):
        n = text_len if text_len is not None else self.default_max_sequence_length
        return [TextStream("t5", self.pipe.tokenizer_2, 0, n)]

    def image_grid(self, call_args, call_kwargs):
        ids = call_kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def scheduler_timestep(self, call_t):
        return call_t * 1000  # FluxPipeline passes timestep / 1000 to the transformer

    def token_grid(self, height, width):
        f = self.vae_scale_factor * 2  # latents are packed 2x2 into tokens
        return height // f, width // f

    def branches(self, batch_rows, call_in_step):
        # FluxPipeline: cond call first, then (true CFG) the uncond call, at the same timestep
        return ["cond" if call_in_step == 0 else "uncond"] * batch_rows

    def encode_prompt(self, prompt, negative_prompt="", do_cfg=False, max_sequence_length=None):
        n = max_sequence_length or self.default_max_sequence_length
        pe, pp, ids = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=n)
        cond = Conditioning(pe, pp, extra={"txt_ids": ids})
        if do_cfg:
            ne, npp, _ = self.pipe.encode_prompt(
                prompt=[negative_prompt] * pe.shape[0], prompt_2=None, max_sequence_length=n
            )
            cond.neg_embeds, cond.neg_pooled = ne, npp
        return cond

    def set_timesteps(self, num_steps, strength=1.0, latents=None, image_seq_len=None):
        """As FluxPipeline: sigmas 1 -> 1/n, shifted by mu when the scheduler uses dynamic shifting."""
        check_strength(strength)
        sched = self.pipe.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if latents is not None and image_seq_len is None:
            image_seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2) if latents.ndim == 4 else latents.shape[1]
        seq = image_seq_len or self.denoiser.config.get("sample_size", 64) ** 2
        mu = self.resolution_shift(seq)
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        return sched.timesteps[self.first_step(num_steps, strength):]

    def pack(self, latents):
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    @staticmethod
    def unpack(tokens, h: int, w: int):
        """Inverse of ``pack``: (B, (h/2)(w/2), 4C) tokens -> (B, C, h, w) latents."""
        b, _, c4 = tokens.shape
        x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c4 // 4, h, w)

    def predict(self, z, t, cond: Conditioning, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0, grid=None):
        """v prediction. z: packed latents (B, N, C*4) with ``grid`` = (h, w) of the packed token grid, or
        4D latents (B, C, h, w), which are packed, predicted and unpacked (the editor's convention).
        guidance_scale is Flux's embedded guidance; true CFG needs a negative in cond and true_cfg_scale > 1."""
        if z.ndim == 4:
            h4, w4 = z.shape[-2:]
            v = self.predict(self.pack(z), t, cond, guidance_scale, true_cfg_scale, grid=(h4 // 2, w4 // 2))
            return self.unpack(v, h4, w4)
        h, w = grid
        img_ids = self.pipe._prepare_latent_image_ids(z.shape[0], h, w, z.device, z.dtype)
        guidance = (
            torch.full([z.shape[0]], guidance_scale, dtype=torch.float32)
            if self.denoiser.config.guidance_embeds
            else None
        )
        ts = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0]) / 1000

        def run(emb, pooled):
            return self.denoiser(
                hidden_states=z,
                timestep=ts,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=emb,
                txt_ids=cond.extra["txt_ids"],
                img_ids=img_ids,
                return_dict=False,
            )[0]

        out = run(cond.embeds, cond.pooled)
        if cond.neg_embeds is not None and true_cfg_scale > 1:
            neg = run(cond.neg_embeds, cond.neg_pooled)
            out = neg + true_cfg_scale * (out - neg)
        return out
