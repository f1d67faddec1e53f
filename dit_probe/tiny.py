"""Tiny, randomly initialised pipelines of every supported family, built offline.

They are the real diffusers pipeline classes with small components made from config dicts and
tokenizers built in memory, so every code path of dit_probe can run without model weights
(tests, docs, a laptop). Their images are noise: use them to exercise code, never to draw
scientific conclusions.

Tokenizers: every word of ``WORDS`` is one token; the words of ``SPLIT_WORDS`` come out as
several pieces in every stream (T5: exactly the listed pieces; CLIP: whatever BPE pieces the
learned merges give), so sub-word merging is exercised. Other words fall back to pieces.
"""

from __future__ import annotations

from collections import Counter

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

WORDS = (
    "a an the of on in with and photo picture small large big tiny red green blue yellow orange "
    "white black pink brown gray cyan car cat dog bus bird tree house circle square triangle star "
    "heart cross ring diamond background sky"
).split()
# word -> the pieces every tiny tokenizer splits it into
SPLIT_WORDS = {"purple": ("pur", "ple"), "giraffe": ("gir", "affe"), "bicycle": ("bicy", "cle")}

CLIP_MAX_LENGTH = 16  # real CLIP: 77
T5_MAX_LENGTH = 16  # real SD3: 256, Flux: 512 (pipeline argument max_sequence_length)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _learned_merges(words) -> list[tuple[str, str]]:
    """BPE merges learned on ``words`` (each listed word then encodes as a single token): repeatedly merge
    the most frequent adjacent pair, ties broken by the pair's text. Written here because the tokenizers
    trainer breaks ties in hash order, so its merges (and the token ids) differed between processes."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == list(best):
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH, words=WORDS):
    """A CLIP BPE tokenizer with the real vocabulary layout: byte chars, byte chars + </w>,
    merge results, then <|startoftext|>, <|endoftext|>. Merges are learned on ``words`` only, so each
    of them is one token and any other word (``SPLIT_WORDS``) comes out in several pieces."""
    chars = list(_bytes_to_unicode().values())
    merges = _learned_merges(words)
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A T5 (SentencePiece Unigram) tokenizer: whole words as '▁word', split words as pieces."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    for split in SPLIT_WORDS.values():
        pieces += [("▁" + split[0], -1.0)] + [(p, -1.0) for p in split[1:]]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?"
    pieces += [(c, -8.0) for c in letters] + [("▁" + c, -8.0) for c in letters]
    pieces = list(dict(pieces).items())
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer, hidden: int, projection: int):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _t5_encoder(tokenizer, d_model: int):
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, flow: bool):
    kwargs = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305) if flow else {}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    ).eval()


def tiny_sd3(seed: int = 0, sd35: bool = False, num_layers: int = 3, heads: int = 4, clip_length: int = CLIP_MAX_LENGTH,
             t5_length: int = T5_MAX_LENGTH, sample_size: int = 16):
    """StableDiffusion3Pipeline (SD3 layout; ``sd35=True``: qk RMS-norm and a dual-attention block).

    Default: image 32x32 -> VAE latent 16x16 -> patch 2 -> 64 image tokens; text = 16 CLIP + 16 T5
    tokens. ``benchmarks/`` builds a narrow one with real token counts (77 CLIP + 256 T5, 1024 image).
    """
    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(clip_length), t5_tokenizer(t5_length)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=heads,
        joint_attention_dim=64,  # == T5 d_model >= 2 x CLIP hidden
        caption_projection_dim=8 * heads,  # == heads * head_dim
        pooled_projection_dim=32,  # == sum of CLIP projection dims
        pos_embed_max_size=sample_size,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, flow=True),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok, 32, 16)).eval(),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok, 32, 16)).eval(),
        tokenizer_2=clip_tokenizer(clip_length),
        text_encoder_3=_t5_encoder(tok_t5, 64),
        tokenizer_3=tok_t5,
    )


def tiny_flux(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2, t5_length: int = T5_MAX_LENGTH):
    """FluxPipeline: 1 double-stream and 2 single-stream blocks, RoPE, guidance embedding (like dev).

    Image 32x32 -> latent 16x16 (4 ch) -> packed 2x2 -> 64 image tokens; text = 16 T5 tokens.
    ``benchmarks/`` builds a narrow one with real token counts (512 T5 tokens; 1024 image tokens at 128 px).
    """
    torch.manual_seed(seed)
    tok, tok_t5 = clip_tokenizer(), t5_tokenizer(t5_length)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 x VAE latent channels (2x2 packing)
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # == T5 d_model
        pooled_projection_dim=32,  # == CLIP hidden
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, flow=True),
        text_encoder=CLIPTextModel(_clip_config(tok, 32, 32)).eval(),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(tok_t5, 32),
        tokenizer_2=tok_t5,
    )


# the tiny UNets' shared shape: latent 16x16, two levels; heads per level, as SD2's attention_head_dim means
_TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)


def _sd_ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_unet(seed: int = 0, prediction_type: str = "v_prediction", text_length: int | None = None):
    """StableDiffusionPipeline with an SD2.1-style UNet (linear projections, v-prediction).

    Image 32x32 -> latent 16x16; cross-attention at 16x16 and 8x8; text = 16 CLIP tokens (or
    ``text_length``: 77 as the real models, which DAAM assumes).
    """
    torch.manual_seed(seed)
    tok = clip_tokenizer() if text_length is None else clip_tokenizer(text_length)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    ).eval()
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=_sd_ddim(prediction_type),
        vae=_vae(4, flow=False),
        text_encoder=CLIPTextModel(_clip_config(tok, 32, 32)).eval(),
        tokenizer=tok,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: an SDXL-style UNet (text-time conditioning, 1 and 2 transformer layers per
    attention block), two CLIP encoders (width 32 each, concatenated to 64), eps prediction.

    Image 32x32 -> latent 16x16; cross-attention at 8x8; text = 16 CLIP tokens.
    """
    torch.manual_seed(seed)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # the six size ids, and the pooled text
        cross_attention_dim=64,
    ).eval()
    scheduler = _sd_ddim("epsilon")
    return StableDiffusionXLPipeline(
        vae=_vae(4, flow=False), text_encoder=CLIPTextModel(_clip_config(tok, 32, 32)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok, 32, 32)).eval(), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=scheduler, add_watermarker=False)


def tiny_pixart(seed: int = 0):
    """PixArtSigmaPipeline: a DiT with cross-attention (PixArtTransformer2DModel, adaLN-single, learned
    sigma), T5 text, DPM-Solver++ as the real model's scheduler.

    Image 32x32 -> latent 16x16 -> 64 image tokens (patch 2); 2 blocks of 2 heads x 16; text = 16 T5 tokens.
    """
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma, as PixArt-alpha/Sigma
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=32,
        norm_num_groups=8,
    ).eval()
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    return PixArtSigmaPipeline(tokenizer=tok, text_encoder=_t5_encoder(tok, 32), vae=_vae(4, flow=False),
                               transformer=transformer, scheduler=scheduler)


TINY = {
    "tiny-sd3": lambda: tiny_sd3(),
    "tiny-sd3.5": lambda: tiny_sd3(sd35=True),
    "tiny-flux": lambda: tiny_flux(),
    "tiny-unet": lambda: tiny_unet(),
    "tiny-pixart": lambda: tiny_pixart(),
    "tiny-sdxl": lambda: tiny_sdxl(),
}


def tiny_pipeline(name: str):
    """Build one of ``TINY`` by name."""
    if name not in TINY:
        raise KeyError(f"unknown tiny pipeline {name!r}; known: {', '.join(TINY)}")
    return TINY[name]()


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A randomly initialised CLIPModel with its tokenizer and image processor, built offline: the
    CLIP judge's and CLIPScore's code paths run on it in tests (its scores mean nothing)."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(model_max_length=77)  # judge prompts are longer than the toy captions
    text = _clip_config(tokenizer, hidden=32, projection=16)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                              image_size=image_size, patch_size=8, projection_dim=16, hidden_act="gelu")
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor
