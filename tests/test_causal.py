"""Activation patching: exact at its ends (a prompt patched with its own states is the plain generation;
the last block's output patched everywhere is the donor's generation) and it finds the one block of a
planted model that may read the text."""

import copy

import pytest
import torch

from dit_probe import get_adapter
from dit_probe.causal import generate, patched_generation, patched_generations

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
