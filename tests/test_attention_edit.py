"""Attention-level read-out and interventions (attention.edit): the attention contribution of a word and
the outputs under withholding and head knockout equal a float64 reference recomputed from each attention
module's captured inputs and own weights (tests/reference.py); reading changes nothing."""

import pytest
import torch

from dit_probe import get_adapter, record
from dit_probe.adapters.base import CROSS, JOINT_IMAGE_TEXT, JOINT_TEXT_IMAGE
from dit_probe.attention.edit import contributions, knock_out, withhold

from .conftest import FAMILIES, generate
from .reference import InputCapture, reference_call

PROMPTS = ["a red car on a blue background", "a small red giraffe"]
WORD = "red"


def _kind(site):
    return {JOINT_IMAGE_TEXT: "sd3", JOINT_TEXT_IMAGE: "flux-double", CROSS: "cross"}.get(site.kind, "flux-single")


def _out_weight(ad, site):
    """The layer's output projection for its image tokens, read off the module tree here."""
    attn = ad.module(site)
    if _kind(site) == "flux-single":
        block = ad.denoiser.get_submodule(site.path.rsplit(".", 1)[0])
        return block.proj_out.weight[:, : attn.heads * (attn.inner_dim // attn.heads)].double()
    return attn.to_out[0].weight.double()


def _word_keys(ad, prompt, text_len, lay):
    pos = sorted({i for p in ad.word_positions(prompt, WORD, text_len).values() for i in p})
    return [(lay["k_text"].start or 0) + i for i in pos]


def _cond_rows(b, name):
    return list(range(b)) if name == "tiny-flux" else list(range(b // 2, b))  # [uncond | cond]


@pytest.mark.parametrize("name", FAMILIES)
def test_contributions_equal_a_float64_reference_and_change_nothing(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    plain = generate(pipe, PROMPTS, steps=2, cfg=name != "tiny-flux")
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    try:
        with contributions(pipe, PROMPTS, WORD) as got:
            edited = generate(pipe, PROMPTS, steps=2, cfg=name != "tiny-flux")
    finally:
        cap.close()
    assert torch.equal(plain, edited)
    assert got.steps == [0, 1] and set(got.layer) == {s.name for s in sites}
    for site in sites:
        w = _out_weight(ad, site)
        for step, (args, kwargs, text_len) in enumerate(cap.calls[site.path]):
            p, v, lay = reference_call(_kind(site), ad.module(site), args, kwargs, text_len)
            d = v.shape[-1]
            for j, row in enumerate(_cond_rows(p.shape[0], name)):
                cols = _word_keys(ad, PROMPTS[j], text_len, lay)
                parts = [(p[row, h, lay["q_image"]][:, cols] @ v[row, h, cols]) @ w[:, h * d:(h + 1) * d].T
                         for h in range(p.shape[1])]
                heads = torch.stack([c.norm(dim=-1).mean() for c in parts])
                layer = sum(parts).norm(dim=-1).mean()
                assert torch.allclose(got.heads[site.name][step, j].double(), heads, rtol=1e-4, atol=1e-7), site.name
                assert torch.allclose(got.layer[site.name][step, j].double(), layer, rtol=1e-4, atol=1e-7), site.name
    assert all(float(t.min()) > 0 for t in got.layer.values())


def _image_output(kind, attn, out, text_len):
    """The image tokens' part of an attention module's output: SD3 and Flux double blocks return
    (image, text), a Flux single block [text | image] before its proj_out, a UNet's attn2 the image."""
    if kind in ("sd3", "flux-double"):
        return out[0]
    return out[:, text_len:] if kind == "flux-single" else out


def _project(kind, attn, o):
    """(b, h, n, d) attention output -> the module's image output (heads merged, output projection)."""
    merged = o.transpose(1, 2).flatten(2)
    if kind == "flux-single":
        return merged
    return merged @ attn.to_out[0].weight.double().T + attn.to_out[0].bias.double()


def _edited_layer_check(pipe, name, layer, context, change):
    """Run ``context`` at ``layer``, step 0: the layer's inputs are those of the plain run, so its image
    output must equal the reference with the probabilities/outputs changed by ``change``."""
    ad = get_adapter(pipe)
    site = next(s for s in ad.sites(recordable_only=True) if s.name == layer)
    outs = []
    cap = InputCapture(ad.denoiser, [site.path])
    hook = ad.module(site).register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with context:
            generate(pipe, PROMPTS, steps=2, cfg=name != "tiny-flux")
    finally:
        cap.close()
        hook.remove()
    args, kwargs, text_len = cap.calls[site.path][0]
    attn = ad.module(site)
    p, v, lay = reference_call(_kind(site), attn, args, kwargs, text_len)
    o = change(p, v, lay, ad, text_len)  # (b, h, queries, d) float64
    img = lay["q_image"]
    expected = _project(_kind(site), attn, o[:, :, img])
    got = _image_output(_kind(site), attn, outs[0], text_len).double()
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4)


LAYER = {"tiny-sd3": "block.01.joint", "tiny-sd3.5": "block.02.joint", "tiny-flux": "single.00.joint",
         "tiny-unet": "up.0.1.0.cross", "tiny-pixart": "block.01.cross",
         "tiny-sdxl": "up.0.1.1.cross"}


@pytest.mark.parametrize("name", FAMILIES)
def test_withholding_a_word_equals_the_reference(pipes, name):
    pipe = pipes(name)

    def masked(p, v, lay, ad, text_len):
        p = p.clone()
        img = lay["q_image"]
        for j, row in enumerate(_cond_rows(p.shape[0], name)):
            cols = _word_keys(ad, PROMPTS[j], text_len, lay)
            block = p[row, :, img]
            block[..., cols] = 0
            p[row, :, img] = block / block.sum(-1, keepdim=True)
        return p @ v

    _edited_layer_check(pipe, name, LAYER[name], withhold(pipe, PROMPTS, WORD, [LAYER[name]], steps=[0]), masked)
    # and the edit is a real one: the image changes
    with withhold(pipe, PROMPTS, WORD, [LAYER[name]]):
        edited = generate(pipe, PROMPTS, steps=2, cfg=name != "tiny-flux")
    assert not torch.allclose(edited, generate(pipe, PROMPTS, steps=2, cfg=name != "tiny-flux"), atol=1e-4)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("name", FAMILIES)
def test_knocking_out_a_head_equals_the_reference(pipes, name, mode):
    pipe = pipes(name)
    head = 1

    def knocked(p, v, lay, ad, text_len):
        o = p @ v
        rows, img, txt = _cond_rows(p.shape[0], name), lay["q_image"], lay["k_text"]
        text_part = p[rows, head][:, img][..., txt] @ v[rows, head][:, txt]  # (rows, image queries, d)
        keep = text_part.mean(0, keepdim=True) if mode == "mean" else 0
        o[rows, head, img] = o[rows, head, img] - text_part + keep
        return o

    _edited_layer_check(pipe, name, LAYER[name], knock_out(pipe, {LAYER[name]: [head]}, mode=mode, steps=[0]), knocked)


def test_bad_inputs_are_named(pipes):
    pipe = pipes("tiny-sd3")
    with pytest.raises(KeyError, match="unknown attention layer.*block.09.joint"):
        withhold(pipe, PROMPTS, WORD, ["block.09.joint"]).__enter__()
    with pytest.raises(ValueError, match="mode must be one of"):
        knock_out(pipe, {"block.00.joint": [0]}, mode="half").__enter__()
    with pytest.raises(ValueError, match="heads 0..3, not \\[5\\]"):
        with knock_out(pipe, {"block.00.joint": [5]}):
            generate(pipe, PROMPTS, steps=1)
    with pytest.raises(KeyError, match="not in prompt"):
        with withhold(pipe, PROMPTS, "purple", ["block.00.joint"]):
            generate(pipe, PROMPTS, steps=1)


def test_two_interceptions_of_one_layer_are_refused_clearly(pipes):
    pipe = pipes("tiny-sd3")
    with pytest.raises(RuntimeError, match="two attention read-outs or edits are on layer block.01.joint"):
        with record(pipe, words=[WORD]), withhold(pipe, PROMPTS, WORD, ["block.01.joint"]):
            generate(pipe, PROMPTS, steps=1)
    with record(pipe, words=[WORD], layers=["block.00.joint"]) as maps, withhold(pipe, PROMPTS, WORD, ["block.01.joint"]):
        generate(pipe, PROMPTS, steps=1)  # different layers: both work
    assert maps.layers == ["block.00.joint"]
