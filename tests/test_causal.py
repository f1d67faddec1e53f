"""Activation patching and LocoGen's text swap: exact at their ends (a prompt patched with its own states
is the plain generation; the last block's output, or every layer's text, patched everywhere gives the
donor's generation); and every causal method and read-out (patching, text swap, attention contribution,
withholding, head knockout) finds the one layer of a planted model that may read the text."""

import copy

import pytest
import torch

from dit_probe import get_adapter
from dit_probe.attention.edit import contributions, knock_out, withhold
from dit_probe.causal import donor_states, generate, patched_generation, patched_generations, text_swap_generations

CALL = dict(num_inference_steps=3, height=32, width=32, output_type="pt", guidance_scale=4.0)
SRC, DONOR = ["a red car on a blue background"], ["a green bus on a white background"]


def _call(pipe):
    return {**CALL, "max_sequence_length": 16} if get_adapter(pipe).family != "unet" else CALL


def _planted(pipes, reader: int = 1):
    """A copy of tiny SD3 whose image stream sees the text's content only in block ``reader``: the other
    blocks' text keys and values are zero, and the pooled text is cut from the modulation."""
    pipe = copy.deepcopy(pipes("tiny-sd3"))
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        if i != reader:
            for proj in (block.attn.add_k_proj, block.attn.add_v_proj):
                torch.nn.init.zeros_(proj.weight)
                torch.nn.init.zeros_(proj.bias)
    pooled = pipe.transformer.time_text_embed.text_embedder.linear_2
    torch.nn.init.zeros_(pooled.weight)
    torch.nn.init.zeros_(pooled.bias)
    return pipe


def _generate(pipe, prompts):
    return generate(pipe, prompts, **_call(pipe))


@pytest.mark.parametrize("name, last", [("tiny-unet", "up.1.out"), ("planted-sd3", "block.02.image")])
def test_patching_is_exact_at_both_ends(pipes, name, last):
    """After a UNet's last up-block nothing reads the text (SD3's final norm reads the pooled text, so the
    planted copy, which has none, stands in for it)."""
    pipe = _planted(pipes) if name == "planted-sd3" else pipes(name)
    plain, donor = _generate(pipe, SRC), _generate(pipe, DONOR)
    assert torch.equal(patched_generation(pipe, SRC, SRC, last, **_call(pipe)), plain)
    assert torch.equal(patched_generation(pipe, SRC, DONOR, last, **_call(pipe)), donor)
    one_step = patched_generation(pipe, SRC, DONOR, last, steps=[-1], **_call(pipe))
    assert not torch.equal(one_step, donor) and not torch.equal(one_step, plain)


def test_patching_localises_the_one_block_that_reads_text(pipes):
    """At the first step (both runs start from the same noise) the image stream before block 1 is the same
    in both runs, so patching it changes nothing; patching block 1's output changes the image."""
    pipe = _planted(pipes, reader=1)
    plain, donor = _generate(pipe, SRC), _generate(pipe, DONOR)
    assert not torch.equal(plain, donor)  # the text still matters, through block 1
    before = patched_generation(pipe, SRC, DONOR, "block.00.image", steps=[0], **_call(pipe))
    at = patched_generation(pipe, SRC, DONOR, "block.01.image", steps=[0], **_call(pipe))
    assert torch.equal(before, plain) and not torch.equal(at, plain)
    moved = _planted(pipes, reader=2)  # the reader moved to block 2: block 1 no longer matters
    assert torch.equal(patched_generation(moved, SRC, DONOR, "block.01.image", steps=[0], **_call(moved)),
                       _generate(moved, SRC))


def test_variants_in_one_batch_equal_separate_runs(pipes):
    pipe = pipes("tiny-sd3")
    prompts, donors = SRC + ["a small cat"], DONOR + ["a large dog"]
    variants = [("block.01.image", None), ("block.00.text", [0]), ("block.01.image", [-1])]
    together = patched_generations(pipe, prompts, donors, variants, **_call(pipe))
    for (site, steps), got in zip(variants, together):
        alone = patched_generation(pipe, prompts, donors, site, steps=steps, **_call(pipe))
        assert torch.allclose(got, alone, atol=1e-5)  # batch size changes float rounding only
    assert not torch.allclose(together[0], together[2], atol=1e-3)


def _planted_unet(pipes, reader: str = "up.0.1.0.cross"):
    """A copy of the tiny UNet whose only text-reading layer is ``reader``: every other cross-attention's
    keys and values are zero (its output is then its output bias, whatever the text)."""
    pipe = copy.deepcopy(pipes("tiny-unet"))
    ad = get_adapter(pipe)
    for site in ad.sites(recordable_only=True):
        if site.name != reader:
            for proj in (ad.module(site).to_k, ad.module(site).to_v):
                torch.nn.init.zeros_(proj.weight)
    return pipe


PLANTED = {"planted-sd3": (_planted, "block.01"), "planted-unet": (_planted_unet, "up.0.1.0")}


@pytest.mark.parametrize("name", ["tiny-unet", "planted-sd3"])
def test_text_swap_is_exact_at_both_ends(pipes, name):
    """No layer swapped: the plain generation; every layer swapped: the donor's (the planted SD3 copy
    has no pooled text, which the swap leaves alone)."""
    pipe = _planted(pipes) if name == "planted-sd3" else pipes(name)
    sites = [h.name for h in get_adapter(pipe).text_input_sites()]
    assert torch.equal(text_swap_generations(pipe, SRC, DONOR, [[]], **_call(pipe))[0], _generate(pipe, SRC))
    assert torch.equal(text_swap_generations(pipe, SRC, DONOR, [sites], **_call(pipe))[0], _generate(pipe, DONOR))
    with pytest.raises(ValueError, match="unknown \\['block.7'\\]"):
        text_swap_generations(pipe, SRC, DONOR, [["block.7"]], **_call(pipe))


@pytest.mark.parametrize("name", list(PLANTED))
def test_every_method_localises_the_one_layer_that_reads_text(pipes, name):
    make, reader = PLANTED[name]
    pipe = make(pipes)
    ad = get_adapter(pipe)
    layers = [s.name for s in ad.sites(recordable_only=True)]
    reader_layer = next(n for n in layers if n.startswith(reader))
    texts = [h.name for h in ad.text_input_sites()]
    reader_text = next(n for n in texts if n.startswith(reader))
    plain = _generate(pipe, SRC)
    assert not torch.equal(plain, _generate(pipe, DONOR))

    # LocoGen's text swap: only the reader's text matters. Patching one layer's incoming text alone: in
    # a joint model the patched text also flows on to later blocks, so every block up to the reader matters
    donor = donor_states(pipe, DONOR, texts, **_call(pipe))
    upstream = texts[:texts.index(reader_text) + 1] if name == "planted-sd3" else [reader_text]
    for site in texts:
        swapped = text_swap_generations(pipe, SRC, DONOR, [[site]], donor=donor, **_call(pipe))[0]
        patched = patched_generation(pipe, SRC, DONOR, site, donor=donor, **_call(pipe))
        assert torch.equal(swapped, plain) == (site != reader_text), site
        assert torch.equal(patched, plain) == (site not in upstream), site

    # the attention contribution of "red" is zero wherever the text's values are zero
    with contributions(pipe, SRC, "red") as c:
        _generate(pipe, SRC)
    assert c.ranking()[0] == reader_layer
    assert all(float(c.layer[n].abs().max()) == 0 for n in layers if n != reader_layer)

    # withholding "red" and knocking out every head's text: the reader's change is the largest (elsewhere the
    # text's values are zero, so only the softmax's normaliser can move when the word's keys go)
    heads = ad.module(ad.sites()[0]).heads
    effect = {}
    for n in layers:
        with withhold(pipe, SRC, "red", [n]):
            withheld = _generate(pipe, SRC)
        with knock_out(pipe, {n: list(range(heads))}):
            knocked = _generate(pipe, SRC)
        effect[n] = float((withheld - plain).abs().max())
        assert torch.equal(knocked, plain) == (n != reader_layer), n
    assert max(effect, key=effect.get) == reader_layer, effect
    if name == "planted-unet":  # cross-attention: no image keys, so the word's keys carry no mass elsewhere
        assert all(effect[n] == 0 for n in layers if n != reader_layer), effect
