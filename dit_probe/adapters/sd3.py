"""SD3 / SD3.5 (StableDiffusion3Pipeline, SD3Transformer2DModel).

Joint attention sees [image | text]; text = CLIP stream (77 positions, CLIP-L and CLIP-G features
side by side) followed by the T5 stream (max_sequence_length positions). SD3.5 blocks listed in
``dual_attention_layers`` also carry ``attn2``, an image-only self-attention with no text keys.
The pipeline batches CFG as [uncond | cond].
"""

from __future__ import annotations

import torch

from .base import (IMAGE_SELF, JOINT_IMAGE_TEXT, Adapter, AttentionSite, Conditioning, HiddenSite, PatchGrid, TextStream,
                   block_name, concept_attention, guided)
from .flow import FlowMatchingMaths


SKIP_LAYER_GUIDANCE = "skip-layer guidance"  # a branch label no recording selects


class SD3Adapter(PatchGrid, FlowMatchingMaths, Adapter):
    family = "sd3"
    denoiser_attr = "transformer"

    @property
    def default_max_sequence_length(self) -> int:
        """The pipeline's own default (256), unless its dit_probe settings say otherwise (toy-mmdit: 0, no T5)."""
        return getattr(self.pipe, "dit_probe_settings", {}).get("max_sequence_length", 256)

    def _find_sites(self):
        sites = []
        for i, block in enumerate(self.denoiser.transformer_blocks):
            dual = getattr(block, "attn2", None) is not None
            sites.append(
                AttentionSite(
                    block_name("block", i, "joint"),
                    f"transformer_blocks.{i}.attn",
                    JOINT_IMAGE_TEXT,
                    "SD3.5 dual-attention block: joint attention" if dual else "",
                )
            )
            if dual:
                sites.append(
                    AttentionSite(
                        block_name("block", i, "image"),
                        f"transformer_blocks.{i}.attn2",
                        IMAGE_SELF,
                        "SD3.5 dual-attention block: image-only attn2",
                    )
                )
        return sites

    def hidden_sites(self):
        """Each joint block's two output streams (the last block has no text output)."""
        out = []
        for i, block in enumerate(self.denoiser.transformer_blocks):
            out.append(HiddenSite(block_name("block", i, "image"), f"transformer_blocks.{i}", part=1))
            if not getattr(block, "context_pre_only", False):
                out.append(HiddenSite(block_name("block", i, "text"), f"transformer_blocks.{i}", part=0))
        return out

    def text_input_sites(self):
        return [HiddenSite(block_name("block", i, "text_in"), f"transformer_blocks.{i}", input="encoder_hidden_states")
                for i in range(len(self.denoiser.transformer_blocks))]

    def streams(self, text_len=None):
        clip_len = self.pipe.tokenizer.model_max_length
        t5_len = (text_len - clip_len) if text_len is not None else self.default_max_sequence_length
        streams = [TextStream("clip", self.pipe.tokenizer, 0, clip_len)]
        if t5_len > 0 and self.pipe.tokenizer_3 is not None:
            streams.append(TextStream("t5", self.pipe.tokenizer_3, clip_len, t5_len))
        return streams

    def branches(self, batch_rows, call_in_step):
        """[uncond | cond] in the step's first call. A second call at the same timestep is skip-layer
        guidance (``skip_guidance_layers``): the conditional rows again, with some blocks skipped. It is
        labelled apart, so it is never averaged into, or mistaken for, the CFG branches."""
        if call_in_step > 0:
            return [SKIP_LAYER_GUIDANCE] * batch_rows
        return super().branches(batch_rows, call_in_step)

    # ----- ConceptAttention (attention.concepts): concept tokens through the joint blocks' text side -----
    def concept_block(self, name, block, c, kwargs, image):
        """One joint block's text side applied to the concept tokens ``c`` (rows, n, D): they attend to the
        block's image keys and to each other (never to the prompt's text) and are updated like text tokens;
        the image and the prompt are untouched. ``image``: the block's own image projections (to_q, to_k,
        to_v outputs) and attention output ``o`` (before to_out). Returns (output-space map (rows, image
        tokens, n): o_image . o_concept, probability map: softmax over the concept keys of the image
        queries, heads averaged, and the concept tokens after the block)."""
        attn, temb = block.attn, kwargs["temb"]
        rows, heads = c.shape[0], attn.heads

        def split(x, norm=None):
            x = x.view(rows, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        if block.context_pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)
        qc = split(attn.add_q_proj(norm_c), attn.norm_added_q)
        kc = split(attn.add_k_proj(norm_c), attn.norm_added_k)
        vc = split(attn.add_v_proj(norm_c))
        qx, kx, vx = split(image["q"], attn.norm_q), split(image["k"], attn.norm_k), split(image["v"])
        oc, out_map, prob_map = concept_attention(qx, kx, vx, image["o"], qc, kc, vc)
        if not block.context_pre_only:
            c = c + gate_msa.unsqueeze(1) * attn.to_add_out(oc)
            normed = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            c = c + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        return out_map, prob_map, c

    def concept_blocks(self):
        """(name, block, taps) of every joint block in order; taps: the image projections (to_q, to_k, to_v
        outputs) and the image attention output (the input of to_out)."""
        return [(block_name("block", i, "joint"), b, {"q": (b.attn.to_q, "out"), "k": (b.attn.to_k, "out"),
                                                       "v": (b.attn.to_v, "out"), "o": (b.attn.to_out[0], "in")})
                for i, b in enumerate(self.denoiser.transformer_blocks)]

    def encode_prompt(self, prompt, negative_prompt="", do_cfg=True, max_sequence_length=None):
        pe, npe, pp, npp = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=negative_prompt if do_cfg else None,
            do_classifier_free_guidance=do_cfg,
            max_sequence_length=self.default_max_sequence_length if max_sequence_length is None else max_sequence_length,
        )
        return Conditioning(pe, pp, npe, npp)

    def predict(self, z, t, cond: Conditioning, guidance_scale: float = 7.5):
        """The model's v prediction at (z, t), with classifier-free guidance when cond has a negative."""
        cfg = cond.neg_embeds is not None and guidance_scale > 1
        zin = torch.cat([z, z]) if cfg else z
        emb = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        pooled = torch.cat([cond.neg_pooled, cond.pooled]) if cfg else cond.pooled
        out = self.denoiser(
            hidden_states=zin,
            timestep=torch.as_tensor(t).expand(zin.shape[0]),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if cfg:
            out = guided(out, guidance_scale)
        return out
