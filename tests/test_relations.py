"""Every attention relation, against the slow reference (the full softmax's block), on every family;
images unchanged; clear refusals where an architecture has no such attention."""

import pytest
import torch

from dit_probe import get_adapter, record
from dit_probe.adapters.base import CROSS, IMAGE_SELF, JOINT_IMAGE_TEXT, JOINT_TEXT_IMAGE
from dit_probe.attention import estimate_recording

from .conftest import FAMILIES, generate
from .reference import InputCapture, reference_block

PROMPTS = ["a red car on a blue background", "a small red giraffe"]
DITS = ["tiny-sd3", "tiny-sd3.5", "tiny-flux"]


def _kind(site):
    return {JOINT_IMAGE_TEXT: "sd3", JOINT_TEXT_IMAGE: "flux-double", CROSS: "cross", IMAGE_SELF: "self"}.get(
        site.kind, "flux-single")


def _record_with_reference(pipe, relation, **kw):
    """Record 2 steps (CFG: both branches; Flux: true CFG), keeping every head, and capture each
    attention call's inputs for the reference. Returns (maps, sites, calls, branches-per-call)."""
    ad = get_adapter(pipe)
    sites = ad.select_sites(None, relation)
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    try:
        with record(pipe, relation=relation, heads="keep", branch="both", **kw) as maps:
            generate(pipe, PROMPTS, steps=2)
    finally:
        cap.close()
    return maps, sites, cap.calls, ad


def _by_branch(ad, refs):
    """(branch [uncond, cond], batch, ...) from one step's reference blocks: one call [uncond | cond],
    or Flux's two calls (cond, then uncond)."""
    if ad.family == "flux":
        return torch.stack([refs[1], refs[0]])
    return torch.stack(refs[0].chunk(2))


@pytest.mark.parametrize("name", DITS)
@pytest.mark.parametrize("relation", ["text->image", "text->text"])
def test_text_query_relations_equal_the_reference(pipes, name, relation):
    """Token indices as queries: their rows of the full softmax, over the image or text keys."""
    pipe = pipes(name)
    tokens = [1, 3]
    maps, sites, calls, ad = _record_with_reference(pipe, relation, tokens=tokens)
    per_step = 2 if ad.family == "flux" else 1
    worst = 0.0
    for site in sites:
        got = maps.tensor(layer=site.name, branch=None)[:, 0].flatten(-2)  # (step, branch, batch, head, token, n)
        for step in range(2):
            refs = [reference_block(_kind(site), ad.module(site), a, k, tl, relation)[:, :, tokens]
                    for a, k, tl in calls[site.path][per_step * step: per_step * (step + 1)]]
            worst = max(worst, (got[step] - _by_branch(ad, refs)).abs().max().item())
    assert worst < 1e-5, worst
    if relation == "text->text":
        assert maps.grids[sites[0].name][0] == 1  # a 1 x text-length "grid"


def test_a_split_word_as_query_is_the_mean_of_its_pieces(pipes):
    pipe = pipes("tiny-sd3")
    ad = get_adapter(pipe)
    maps, sites, calls, _ = _record_with_reference(pipe, "text->image", words={"w": ["car", "giraffe"]})
    site = sites[0]
    args, kwargs, tl = calls[site.path][0]
    pos = ad.word_positions(PROMPTS[1], "giraffe", tl)  # batch item 1 holds the word
    ref = reference_block("sd3", ad.module(site), args, kwargs, tl, "text->image").chunk(2)[1][1]  # cond, item 1
    got = maps.tensor("w", layer=site.name, step=0, branch="cond", stream="t5")[0, 0, 0, 1, :, 0].flatten(-2)
    assert len(pos["t5"]) == 2
    assert (got - ref[:, pos["t5"]].mean(1)).abs().max() < 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_image_query_sets_equal_the_mean_of_their_queries(pipes, name):
    """A mask selecting the top half of the image and a point at the centre: each set's map is the mean
    of its queries' rows over the image keys (UNet: its self-attention; SD3.5: also the image-only attn2)."""
    pipe = pipes(name)
    queries = {"top": torch.tensor([[1.0], [0.0]]), "centre": (0.5, 0.5)}
    maps, sites, calls, ad = _record_with_reference(pipe, "image->image", queries=queries)
    assert any(s.kind == IMAGE_SELF for s in sites) == (name in ("tiny-sd3.5", "tiny-unet", "tiny-pixart", "tiny-sdxl"))
    per_step = 2 if ad.family == "flux" else 1
    worst = 0.0
    for site in sites:
        h, w = maps.grids[site.name]
        top = torch.arange(h * w).view(h, w)[: h // 2].flatten()
        centre = (h // 2) * w + w // 2
        got = maps.tensor(layer=site.name, branch=None, grid=(h, w))[:, 0].flatten(-2)
        for step in range(2):
            refs = []
            for a, k, tl in calls[site.path][per_step * step: per_step * (step + 1)]:
                p = reference_block(_kind(site), ad.module(site), a, k, tl, "image->image")
                refs.append(torch.stack([p[:, :, top].mean(2), p[:, :, centre]], dim=2))
            worst = max(worst, (got[step] - _by_branch(ad, refs)).abs().max().item())
    assert worst < 1e-5, worst


@pytest.mark.parametrize("name", FAMILIES)
def test_relations_leave_images_unchanged(pipes, name):
    pipe = pipes(name)
    plain = generate(pipe, PROMPTS)
    relations = [("image->image", dict(queries={"c": (0.5, 0.5)}))]
    if name not in ("tiny-unet", "tiny-pixart", "tiny-sdxl"):  # cross-attention: no text queries
        relations += [("text->image", dict(words=["red"])), ("text->text", dict(tokens=[2]))]
    for relation, kw in relations:
        with record(pipe, relation=relation, **kw):
            assert torch.equal(generate(pipe, PROMPTS), plain)


def test_refusals_name_what_is_wrong(pipes):
    unet, sd3 = pipes("tiny-unet"), pipes("tiny-sd3")
    with pytest.raises(ValueError, match="text tokens are never updated by cross-attention"):
        record(unet, words=["red"], relation="text->image").__enter__()
    with pytest.raises(ValueError, match="relation must be one of"):
        record(sd3, words=["red"], relation="image-text").__enter__()
    with pytest.raises(ValueError, match="needs queries="):
        record(sd3, relation="image->image").__enter__()
    with pytest.raises(ValueError, match="not words or tokens"):
        record(sd3, words=["red"], relation="image->image", queries={"c": (0.5, 0.5)}).__enter__()
    with pytest.raises(ValueError, match=r"fractions of height and width"):
        record(sd3, relation="image->image", queries={"c": (2, 0.5)}).__enter__()
    with pytest.raises(ValueError, match="2D"):
        record(sd3, relation="image->image", queries={"m": torch.ones(3)}).__enter__()
    with pytest.raises(ValueError, match="has no text->image attention"):
        record(pipes("tiny-sd3.5"), words=["red"], relation="text->image", layers=["block.00.image"]).__enter__()
    with record(sd3, tokens=[1], relation="text->image") as maps:
        generate(sd3, PROMPTS[:1], steps=1)
    with pytest.raises(ValueError, match="normalise='text'"):
        maps.tensor(normalise="text")


@pytest.mark.parametrize("relation,kw", [("image->image", dict(queries={"a": (0.1, 0.1), "b": torch.ones(4, 4)})),
                                         ("text->text", dict(tokens=[1, 5])), ("text->image", dict(words=["red"]))])
def test_estimate_holds_for_every_relation(pipes, relation, kw):
    pipe = pipes("tiny-flux")
    with record(pipe, relation=relation, **kw) as maps:
        generate(pipe, PROMPTS, steps=2, height=48, width=32)
    maps._build()
    held = sum(t.nbytes for t in maps._data.values())
    assert estimate_recording(pipe, 48, 32, 2, batch=2, relation=relation, text_len=16, **kw).total == held
