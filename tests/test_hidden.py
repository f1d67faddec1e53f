"""Hidden states: intervene leaves outputs bit-identical under the identity, adds a known delta exactly
(against a plain forward hook written here), at the chosen steps and branch only; record_states reads
what the module returned; hooks go away on exit and after errors."""

import pytest
import torch

from dit_probe import get_adapter
from dit_probe.hidden import intervene, record_states

from .conftest import FAMILIES, generate

PROMPTS = ["a red car on a blue background", "a small red giraffe"]
SITE = {"tiny-sd3": "block.01.image", "tiny-sd3.5": "block.00.text", "tiny-flux": "single.00.text", "tiny-unet": "mid.out",
        "tiny-pixart": "block.00.image", "tiny-sdxl": "mid.out"}


def test_hidden_site_names(pipes):
    assert [h.name for h in get_adapter(pipes("tiny-unet")).hidden_sites()] == [
        "down.0.out", "down.1.out", "mid.out", "up.0.out", "up.1.out"]
    sd3 = [h.name for h in get_adapter(pipes("tiny-sd3")).hidden_sites()]
    assert sd3 == ["block.00.image", "block.00.text", "block.01.image", "block.01.text", "block.02.image"]  # last: no text out
    flux = [h.name for h in get_adapter(pipes("tiny-flux")).hidden_sites()]
    assert flux[:2] == ["double.00.image", "double.00.text"] and flux[-1] == "single.01.text"


def test_text_input_site_names(pipes):
    assert [h.name for h in get_adapter(pipes("tiny-unet")).text_input_sites()] == [
        "down.0.0.0.text_in", "down.1.0.0.text_in", "mid.0.0.0.text_in", "up.0.0.0.text_in", "up.0.1.0.text_in",
        "up.1.0.0.text_in", "up.1.1.0.text_in"]
    assert [h.name for h in get_adapter(pipes("tiny-sd3")).text_input_sites()] == [
        "block.00.text_in", "block.01.text_in", "block.02.text_in"]
    assert [h.name for h in get_adapter(pipes("tiny-flux")).text_input_sites()] == [
        "double.00.text_in", "single.00.text_in", "single.01.text_in"]


# each text input and the state it must equal: the previous block's text output, or the denoiser's own
# encoder_hidden_states after its context embedder ("embedded") or as given ("given": a UNet's text)
TEXT_FEEDS = {
    "tiny-sd3": {"block.00.text_in": "embedded", "block.01.text_in": "block.00.text", "block.02.text_in": "block.01.text"},
    "tiny-flux": {"double.00.text_in": "embedded", "single.00.text_in": "double.00.text", "single.01.text_in": "single.00.text"},
    "tiny-unet": {"down.1.0.0.text_in": "given", "mid.0.0.0.text_in": "given", "up.0.1.0.text_in": "given"},
}


@pytest.mark.parametrize("name", list(TEXT_FEEDS))
def test_text_inputs_are_what_each_block_receives(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    feeds = TEXT_FEEDS[name]
    raw = {"given": [], "embedded": []}
    hooks = [ad.denoiser.register_forward_pre_hook(
        lambda m, a, kw: raw["given"].append(kw["encoder_hidden_states"].clone()), with_kwargs=True)]
    if name != "tiny-unet":
        hooks.append(ad.denoiser.context_embedder.register_forward_hook(lambda m, a, o: raw["embedded"].append(o.clone())))
    outputs = sorted({v for v in feeds.values() if v not in raw})
    try:
        with record_states(pipe, [*feeds, *outputs], branch="both", tokens="keep") as states:
            generate(pipe, PROMPTS, cfg=name != "tiny-flux")
    finally:
        for h in hooks:
            h.remove()
    for site, source in feeds.items():
        expected = torch.stack(raw[source]).float() if source in raw else states[source]
        assert states[site].shape == expected.shape and torch.equal(states[site], expected), (site, source)
    assert not torch.equal(states[list(feeds)[0]], states[list(feeds)[-1]]) or name == "tiny-unet"


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_edit_is_bit_identical_on_every_site(pipes, name):
    pipe = pipes(name)
    plain = generate(pipe, PROMPTS)
    ad = get_adapter(pipe)
    sites = [h.name for h in [*ad.hidden_sites(), *ad.text_input_sites()]]
    with intervene(pipe, {s: (lambda h, call: h) for s in sites}, branch="both"):
        edited = generate(pipe, PROMPTS)
    assert torch.equal(plain, edited)


def _reference_hook(pipe, site_name, delta, step):
    """The obvious way: a raw forward hook adding delta to the conditional rows at one timestep."""
    ad = get_adapter(pipe)
    site = ad.hidden_site(site_name)
    state = {"t": None}

    def pre(module, args, kwargs):
        state["t"] = ad.scheduler_timestep(ad.timestep_of(args, kwargs))
        state["rows"] = ad.batch_rows(args, kwargs)

    def post(module, args, output):
        if abs(state["t"] - float(pipe.scheduler.timesteps[step])) > 1e-3:
            return None
        parts = list(output) if site.part is not None else [output]
        h = parts[site.part or 0].clone()
        half = state["rows"] // 2 if ad.family != "flux" else 0  # [uncond | cond]; Flux here without true CFG
        h[half:] += delta
        parts[site.part or 0] = h
        return type(output)(parts) if site.part is not None else h

    return [ad.denoiser.register_forward_pre_hook(pre, with_kwargs=True),
            ad.denoiser.get_submodule(site.path).register_forward_hook(post)]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_known_delta_at_one_step_and_branch_is_exact(pipes, name):
    pipe = pipes(name)
    cfg = name != "tiny-flux"
    site = SITE[name]
    with record_states(pipe, [site], tokens="keep") as states:
        generate(pipe, PROMPTS, cfg=cfg)
    kept = states[site].shape  # (step, batch, N, C) or (step, batch, C, h, w)
    shape = kept[2:] if get_adapter(pipe).hidden_site(site).layout == "tokens" else (kept[2], 1, 1)
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.5
    hooks = _reference_hook(pipe, site, delta, step=1)
    try:
        reference = generate(pipe, PROMPTS, cfg=cfg)
    finally:
        for h in hooks:
            h.remove()
    with intervene(pipe, {site: delta}, steps=[1], branch="cond"):
        edited = generate(pipe, PROMPTS, cfg=cfg)
    plain = generate(pipe, PROMPTS, cfg=cfg)
    assert torch.equal(edited, reference)
    assert not torch.equal(edited, plain)  # the delta did something


@pytest.mark.parametrize("name", FAMILIES)
def test_record_states_reads_the_module_output(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    site = ad.hidden_site(SITE[name])
    raw = []
    hook = ad.denoiser.get_submodule(site.path).register_forward_hook(
        lambda m, a, o: raw.append((o if site.part is None else o[site.part]).detach().clone()))
    try:
        with record_states(pipe, [site.name], branch="both") as mean, record_states(pipe, [site.name], steps=[-1]) as last:
            generate(pipe, PROMPTS, steps=3, cfg=name != "tiny-flux")
    finally:
        hook.remove()
    dims = (2, 3) if site.layout == "spatial" else (1,)
    expected = torch.stack([r.float().mean(dim=dims) for r in raw])  # (step, rows, channels)
    assert mean.steps == [0, 1, 2] and torch.allclose(mean[site.name], expected, atol=0, rtol=0)
    cond = expected[-1, len(PROMPTS):] if name != "tiny-flux" else expected[-1]
    assert last.steps == [2] and torch.equal(last[site.name][0], cond)


def test_hooks_are_removed_after_errors_and_bad_inputs_are_named(pipes):
    pipe = pipes("tiny-unet")
    ad = get_adapter(pipe)
    before = (len(ad.denoiser._forward_pre_hooks), len(ad.denoiser.mid_block._forward_hooks))

    def boom(h, call):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        with intervene(pipe, {"mid.out": boom}):
            generate(pipe, PROMPTS, steps=1)
    assert (len(ad.denoiser._forward_pre_hooks), len(ad.denoiser.mid_block._forward_hooks)) == before
    with pytest.raises(KeyError, match="unknown hidden site 'mid'.*mid.out"):
        intervene(pipe, {"mid": 0.0}).__enter__()
    with pytest.raises(ValueError, match="branch must be one of"):
        intervene(pipe, {"mid.out": 0.0}, branch="neg").__enter__()
    with pytest.raises(ValueError, match="tokens must be"):
        record_states(pipe, ["mid.out"], tokens="max").__enter__()
