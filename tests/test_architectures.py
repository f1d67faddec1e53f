"""Real architectures with random weights: the shipped public configs give the published sizes, and
the recorder is exact at true widths, head sizes and token counts (at reduced resolution: these are
tests, the true-size runs are benchmarks)."""

import pytest
import torch

from dit_probe import get_adapter, record
from dit_probe.adapters.base import CROSS, JOINT_IMAGE_TEXT, JOINT_TEXT_IMAGE
from dit_probe.architectures import MODELS, build, parameter_count, random_text_inputs, real_pipeline

from .reference import InputCapture, reference_probs


def test_every_registered_real_model_ships_its_architecture():
    assert set(MODELS) == {"sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell", "sd2.1"}


def test_parameter_counts_are_the_published_ones():
    # exact counts as published for these checkpoints
    assert parameter_count("sd2.1") == 865_910_724
    assert parameter_count("flux-dev") == 11_901_408_320
    assert parameter_count("sd3-medium") == 2_028_328_000
    # schnell = dev without the guidance embedder (two linear layers 256 -> 3072 -> 3072)
    assert parameter_count("flux-schnell") == 11_901_408_320 - (256 * 3072 + 3072 + 3072 * 3072 + 3072)
    # "8.1B" for SD3.5-large; "2.5B" for SD3.5-medium counts its stored 384x384 position table too
    assert round(parameter_count("sd3.5-large") / 1e8) == 81
    assert round((parameter_count("sd3.5-medium") + 384 * 384 * 1536) / 1e8) == 25
    assert round(parameter_count("sd2.1", "text_encoder") / 1e7) == 34  # OpenCLIP ViT-H text tower, "340M"


def test_build_is_seeded_typed_and_truncated():
    a = build("sd3-medium", dtype=torch.bfloat16, layers=1, seed=3)
    b = build("sd3-medium", dtype=torch.bfloat16, layers=1, seed=3)
    c = build("sd3-medium", dtype=torch.bfloat16, layers=1, seed=4)
    assert len(a.transformer_blocks) == 1 and a.config.num_attention_heads == 24
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert a.pos_embed.pos_embed.dtype == torch.float32  # a computed table, kept as real checkpoints keep it
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["transformer_blocks.0.attn.to_q.weight"], pc["transformer_blocks.0.attn.to_q.weight"])
    with pytest.raises(ValueError, match="UNet"):
        build("sd2.1", layers=2)
    with pytest.raises(KeyError, match="shipped: "):
        build("sd4")


def test_random_text_inputs_have_the_true_shapes():
    sd3 = random_text_inputs("sd3-medium", batch=2)
    assert {k: tuple(v.shape) for k, v in sd3.items()} == {
        "prompt_embeds": (2, 333, 4096), "pooled_prompt_embeds": (2, 2048),
        "negative_prompt_embeds": (2, 333, 4096), "negative_pooled_prompt_embeds": (2, 2048)}
    flux = random_text_inputs("flux-dev")
    assert {k: tuple(v.shape) for k, v in flux.items()} == {"prompt_embeds": (1, 512, 4096), "pooled_prompt_embeds": (1, 768)}
    assert torch.equal(random_text_inputs("sd2.1", seed=5)["prompt_embeds"], random_text_inputs("sd2.1", seed=5)["prompt_embeds"])


def _kind(site):
    return {JOINT_IMAGE_TEXT: "sd3", JOINT_TEXT_IMAGE: "flux-double", CROSS: "cross"}.get(site.kind, "flux-single")


@pytest.mark.parametrize("name", ["sd3.5-medium", "sd3.5-large", "flux-dev"])
def test_recorder_is_exact_at_true_width(name):
    """One block of each kind at true width (SD3.5-medium: a dual-attention block; Flux-dev: head size
    128 with its 16/56/56 RoPE axes), true text lengths (333; 512), 128x128 pixels, 2 steps: every
    recorded probability equals the independent reference, and the images do not change."""
    pipe = real_pipeline(name, layers=1)
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    cfg = ad.classifier_free_guidance
    text = random_text_inputs(name, seed=1)
    text_len = text["prompt_embeds"].shape[1]
    cols = [0, 5, 76, 77, 200, text_len - 1]

    def run():
        return pipe(**text, height=128, width=128, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    plain = run()
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    try:
        with record(pipe, tokens=cols, heads="keep", branch="both" if cfg else "cond") as maps:
            recorded = run()
    finally:
        cap.close()
    assert torch.equal(plain, recorded)
    assert maps.paths and all(set(p) == {"kernel"} for p in maps.paths.values())
    worst = 0.0
    for site in sites:
        got = maps.tensor(layer=site.name, branch=None)[:, 0].flatten(-2)  # (step, branch, batch, head, token, n)
        for step, (args, kwargs, tl) in enumerate(cap.calls[site.path]):
            ref = reference_probs(_kind(site), ad.module(site), args, kwargs, tl, dtype=torch.float64)[..., cols]
            ref = torch.stack(ref.chunk(2)) if cfg else ref[None]  # (branch, batch, head, n, token)
            worst = max(worst, (got[step].double() - ref.transpose(-1, -2)).abs().max().item())
    assert worst < 1e-6, worst


def test_sd21_full_pipeline_records_words_on_every_level_at_an_odd_size():
    """The true-size SD2.1 pipeline (UNet, OpenCLIP-H text encoder, VAE) at 200x328 pixels: latent
    25x41, then 13x21, 7x11 and 4x6 by level (rounding up), words found by the tokenizer."""
    pipe = real_pipeline("sd2.1", vae=True, text_encoder=True)

    def run():
        return pipe("a red car", height=200, width=328, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    plain = run()
    with record(pipe, words=["red", "car"]) as maps:
        recorded = run()
    assert torch.equal(plain, recorded)
    assert set(maps.grids.values()) == {(25, 41), (13, 21), (7, 11), (4, 6)}
    assert maps.grids["mid.0.0.0.cross"] == (4, 6) and maps.grids["up.3.2.0.cross"] == (25, 41)
    ad = get_adapter(pipe)  # the estimate's arithmetic predicts the grids the recorder read
    assert maps.grids == {s.name: ad.layer_grid(s, ad.token_grid(200, 328)) for s in ad.sites(recordable_only=True)}
    m = maps.tensor("red")
    assert m.shape[-2:] == (25, 41) and torch.isfinite(m).all()
    # every query's probabilities over the 77 text keys sum to 1, so one word's share is in (0, 1)
    assert 0 < m.min() and m.max() < 1
