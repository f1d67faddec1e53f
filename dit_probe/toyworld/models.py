"""Components of the toy pair, built from config dicts (the architecture lives here, the
training recipe in ``train.py``).

Shared by both models: one CLIP-style BPE tokenizer over the toy vocabulary (every word is one
token, 16 positions), one frozen random CLIP text encoder, and one trained VAE (32x32 RGB ->
16x16x4 latent). toy-mmdit adds a second frozen random CLIP encoder (SD3 reads two CLIP streams side
by side) and has no T5 stream, so its joint attention sees 64 image + 16 text tokens.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..tiny import clip_tokenizer
from .world import IMAGE_SIZE, VOCABULARY

TEXT_LENGTH = 16
LATENT_SIZE = IMAGE_SIZE // 2
CLIP_HIDDEN = 64
CLIP_PROJECTION = 32


def tokenizer():
    return clip_tokenizer(TEXT_LENGTH, words=VOCABULARY)


def text_encoder(tok, seed: int, with_projection: bool = True):
    """A frozen, randomly initialised CLIP text encoder (2 layers, width 64)."""
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=4 * CLIP_HIDDEN,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=CLIP_PROJECTION,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config)
    if not with_projection:
        plain = CLIPTextModel(config)
        plain.load_state_dict(model.text_model.state_dict())
        model = plain
    return model.eval().requires_grad_(False)


def vae(scaling_factor: float = 1.0, shift_factor: float = 0.0):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def mmdit(seed: int = 0):
    """SD3Transformer2DModel: 4 joint blocks, 4 heads x 32, patch 2 over the 16x16 latent (64 tokens)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * CLIP_HIDDEN,  # the two CLIP streams side by side
        caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_PROJECTION,
        pos_embed_max_size=LATENT_SIZE,
    )


def unet(seed: int = 0):
    """UNet2DConditionModel, SD2-style (linear projections, v-prediction): cross-attention at 16x16 and 8x8."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 112),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=2,  # SD2 convention: the number of heads
        use_linear_projection=True,
        norm_num_groups=16,
    )


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())
