"""The recorder: exact, output-preserving, layout-correct, restoring, with clear errors."""

import pytest
import torch
import torch.nn.functional as F

from dit_probe import AttentionMaps, get_adapter, record
from dit_probe.adapters.base import CROSS, JOINT_IMAGE_TEXT, JOINT_TEXT_IMAGE

from .conftest import FAMILIES, generate
from .reference import InputCapture, reference_probs

PROMPTS = ["a red car on a blue background", "a small red giraffe"]  # different lengths


def _ref_kind(site):
    return {JOINT_IMAGE_TEXT: "sd3", JOINT_TEXT_IMAGE: "flux-double", CROSS: "cross"}.get(site.kind, "flux-single")


@pytest.mark.parametrize("name", FAMILIES)
def test_recording_leaves_images_and_module_outputs_unchanged(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    mods = [ad.module(s) for s in ad.sites()]

    def run(recording):
        outs = []
        hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for m in mods]
        try:
            if recording:
                with record(pipe, words=["a"], tokens=[1, 3], heads="keep", branch="both"):
                    img = generate(pipe, PROMPTS)
            else:
                img = generate(pipe, PROMPTS)
        finally:
            for h in hooks:
                h.remove()
        return img, outs

    plain, plain_outs = run(False)
    rec, rec_outs = run(True)
    assert (plain - rec).abs().max().item() == 0.0
    assert len(plain_outs) == len(rec_outs) > 0
    assert max((a - b).abs().max().item() for a, b in zip(plain_outs, rec_outs)) == 0.0


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["auto", "chunked"])
def test_probabilities_equal_naive_reference(pipes, name, method):
    """Every layer, every step, both CFG branches, batch of 2, every head, all text positions."""
    pipe = pipes(name)
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    text_len = 32 if ad.family == "sd3" else 16
    try:
        with record(pipe, tokens=list(range(text_len)), heads="keep", branch="both", method=method, chunk_size=7) as maps:
            generate(pipe, PROMPTS, steps=2)
    finally:
        cap.close()
    worst = 0.0
    calls_per_step = 2 if ad.family == "flux" else 1
    for site in sites:
        got = maps.tensor(layer=site.name, branch=None)[:, 0]  # (step, branch, batch, head, token, y, x)
        got = got.flatten(-2)  # (step, branch, batch, head, token, n)
        calls = cap.calls[site.path]
        assert len(calls) == 2 * calls_per_step
        for step in range(2):
            if calls_per_step == 1:  # one call, rows [uncond | cond]
                args, kwargs, tl = calls[step]
                ref = reference_probs(_ref_kind(site), ad.module(site), args, kwargs, tl)
                ref = torch.stack(ref.chunk(2))  # (branch, batch, head, n, text)
            else:  # Flux: a cond call, then an uncond call
                refs = [reference_probs(_ref_kind(site), ad.module(site), a, k, tl) for a, k, tl in calls[2 * step : 2 * step + 2]]
                ref = torch.stack([refs[1], refs[0]])
            ref = ref.transpose(-1, -2)  # (branch, batch, head, text, n)
            worst = max(worst, (got[step] - ref).abs().max().item())
    assert worst < 1e-5, worst


def test_fast_chunked_and_naive_methods_agree(pipes):
    pipe = pipes("tiny-sd3")
    res = {}
    for method in ("auto", "chunked", "naive"):
        with record(pipe, words=["red", "giraffe", "car"][:1], tokens=[0, 20], heads="keep", method=method) as maps:
            generate(pipe, PROMPTS[:1], steps=2)
        res[method] = maps.tensor()
    assert (res["auto"] - res["naive"]).abs().max() < 1e-6
    assert (res["chunked"] - res["naive"]).abs().max() < 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_token_layout(pipes, name):
    """The text keys sit where the adapter says: SD3 [image | text], Flux [text | image] (single-stream
    blocks too), UNet cross-attention. Checked on the keys the model hands to SDPA."""
    pipe = pipes(name)
    ad = get_adapter(pipe)
    seen = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, *a, **kw):  # diffusers' dispatcher passes them by keyword
        seen.append((query.shape[-2], key))
        return original(query, key, value, *a, **kw)

    cap = InputCapture(ad.denoiser, [s.path for s in ad.sites(recordable_only=True)])
    F.scaled_dot_product_attention = spy
    try:
        generate(pipe, PROMPTS[:1], steps=1, cfg=False)
    finally:
        F.scaled_dot_product_attention = original
        cap.close()
    n_img = 64
    text_len = cap.text_lens[0]
    expected = {"tiny-sd3": "image|text", "tiny-sd3.5": "image|text", "tiny-flux": "text|image", "tiny-unet": "cross",
                "tiny-pixart": "cross", "tiny-sdxl": "cross"}[name]
    for site in ad.sites(recordable_only=True):
        args, kwargs, _ = cap.calls[site.path][0]
        attn = ad.module(site)
        hs = kwargs.get("hidden_states", args[0] if args else None)
        # find this module's SDPA call by its query length and key content
        if expected == "cross":
            assert site.kind == CROSS
            q_len, k = next((ql, k) for ql, k in seen if ql == hs.shape[1] and k.shape[-2] == text_len)
            img_sl, txt_sl = site.ranges(q_len, k.shape[-2], text_len)
            assert (img_sl.start, img_sl.stop, txt_sl.start, txt_sl.stop) == (0, hs.shape[1], 0, text_len)
            continue
        n_tokens = n_img + text_len
        matches = [k for ql, k in seen if ql == n_tokens]
        img_sl, txt_sl = site.ranges(n_tokens, n_tokens, text_len)
        if expected == "image|text":
            assert (img_sl.start, txt_sl.start) == (0, n_img)
        else:
            assert (txt_sl.start, img_sl.start) == (0, text_len)
        if site.kind == JOINT_IMAGE_TEXT:
            # the text keys are the added (context) projections; the image keys come from to_k
            ehs = kwargs["encoder_hidden_states"]
            ek = attn.add_k_proj(ehs)
            ek = ek.view(1, text_len, attn.heads, -1).transpose(1, 2)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            assert any(torch.allclose(k[:, :, txt_sl], ek, atol=1e-6) for k in matches), site.name
        if site.kind == "single":
            # single-stream: the block's input is [text | image]: the first text_len rows are text
            assert hs.shape[1] == n_tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_processors_restored_after_exit_and_exception(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    before = {s.path: ad.module(s).processor for s in ad.sites()}
    with record(pipe, words=["red"]):
        assert any(ad.module(s).processor is not before[s.path] for s in ad.sites())
        generate(pipe, PROMPTS[:1], steps=1)
    assert {s.path: ad.module(s).processor for s in ad.sites()} == before
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert "encode_prompt" not in pipe.__dict__
    with pytest.raises(ZeroDivisionError):
        with record(pipe, words=["red"]):
            generate(pipe, PROMPTS[:1], steps=1)
            raise ZeroDivisionError("raised inside the context")
    assert {s.path: ad.module(s).processor for s in ad.sites()} == before
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert "encode_prompt" not in pipe.__dict__
    assert not ad.denoiser._forward_pre_hooks


def test_error_inside_generation_also_restores(pipes):
    pipe = pipes("tiny-sd3")
    ad = get_adapter(pipe)
    before = [ad.module(s).processor for s in ad.sites()]
    with pytest.raises(IndexError, match="out of range"):
        with record(pipe, words=["red"], steps=[5]):
            generate(pipe, PROMPTS[:1], steps=3)
    assert [ad.module(s).processor for s in ad.sites()] == before


def test_batch_with_prompts_of_different_lengths_maps_each_prompt(pipes):
    """'car' sits at different positions in the two prompts; each image gets its own word's map."""
    pipe = pipes("tiny-unet")
    prompts = ["a red car", "a very big red car on a green background"]
    ad = get_adapter(pipe)
    pos = [ad.word_positions(p, "car")["clip"] for p in prompts]
    assert pos[0] != pos[1]
    with record(pipe, words=["car"], tokens=sorted({*pos[0], *pos[1]}), heads="keep") as maps:
        generate(pipe, prompts, steps=1)
    by_index = {p: maps.tensor(word=p, layer=0) for p in sorted({*pos[0], *pos[1]})}
    car = maps.tensor(word="car", layer=0)
    for b in range(2):
        expect = sum(by_index[p][:, :, :, b] for p in pos[b])
        assert torch.allclose(car[:, :, :, b], expect, atol=1e-7)
    assert maps.prompts == prompts


def test_heads_mean_steps_and_branch_selection(pipes):
    pipe = pipes("tiny-sd3")
    with record(pipe, words=["red"], heads="keep", branch="both") as full:
        generate(pipe, PROMPTS, steps=3)
    with record(pipe, words=["red"], steps=[0, -1], layers="block.0[12].joint") as sub:
        generate(pipe, PROMPTS, steps=3)
    assert sub.steps == [0, 2] and sub.layers == ["block.01.joint", "block.02.joint"] and sub.branches == ["cond"]
    a = sub.tensor()
    b = full.tensor(step=[0, 2], layer=[1, 2], branch="cond").mean(dim=4, keepdim=True)
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-7)
    with record(pipe, words=["red"], mean_over_steps=True) as avg:
        generate(pipe, PROMPTS, steps=3)
    assert avg.steps == [-1]
    expect = full.tensor(branch="cond").mean(dim=(0, 4), keepdim=True)
    assert torch.allclose(avg.tensor(), expect, atol=1e-6)


def test_several_generations_append_to_the_batch_axis(pipes):
    pipe = pipes("tiny-flux")
    with record(pipe, words=["red"]) as maps:
        generate(pipe, PROMPTS[:1], steps=2, seed=0)
        generate(pipe, PROMPTS[:1], steps=2, seed=1)
    with record(pipe, words=["red"]) as one:
        generate(pipe, PROMPTS[:1], steps=2, seed=1)
    t = maps.tensor()
    assert t.shape[3] == 2 and maps.prompts == PROMPTS[:1] * 2
    assert torch.equal(t[:, :, :, 1:], one.tensor())
    assert not torch.allclose(t[:, :, :, 0], t[:, :, :, 1])


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-unet"])
def test_text_renormalised_view_sums_to_one_over_all_text(pipes, name):
    pipe = pipes(name)
    n = 32 if name == "tiny-sd3" else 16
    with record(pipe, tokens=list(range(n)), text_mass=True) as maps:
        generate(pipe, PROMPTS[:1], steps=1)
    raw = maps.tensor(layer=0).sum(dim=5)
    norm = maps.tensor(layer=0, normalise="text").sum(dim=5)
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-5)
    if name == "tiny-unet":
        assert torch.allclose(raw, torch.ones_like(raw), atol=1e-5)  # cross-attention: all keys are text
    else:
        assert raw.max() < 1.0 - 1e-3  # joint softmax: some mass goes to image keys


def test_save_and_load_roundtrip(pipes, tmp_path):
    pipe = pipes("tiny-unet")
    with record(pipe, words=["red", "car"], heads="keep", text_mass=True) as maps:
        generate(pipe, PROMPTS[:1], steps=2)
    maps.save(tmp_path / "m")
    back = AttentionMaps.load(tmp_path / "m")
    assert back.layers == maps.layers and back.tokens == maps.tokens and back.steps == maps.steps
    assert back.grids == maps.grids and back.prompts == maps.prompts
    for layer in maps.layers:  # SD2-style UNets have different head counts per layer
        assert torch.equal(back.tensor(layer=layer), maps.tensor(layer=layer))
        assert torch.equal(back.tensor(layer=layer, normalise="text"), maps.tensor(layer=layer, normalise="text"))
    with pytest.raises(ValueError, match="different numbers of heads"):
        back.tensor()
    with pytest.raises(FileNotFoundError, match="maps.json"):
        AttentionMaps.load(tmp_path / "nothing")
    # damaged folders: one line naming the file and what to do, never a raw library error
    import shutil

    from dit_probe.attention import MapsFileError

    for name, damage in (("maps.safetensors", lambda b: b[: len(b) // 2]), ("maps.safetensors", lambda b: b"x" * 10),
                         ("maps.json", lambda b: b[:-5]), ("maps.json", lambda b: b'{"family": "unet"}')):
        bad = tmp_path / f"bad-{name}-{len(damage(b'0123456789'))}"
        shutil.copytree(tmp_path / "m", bad)
        (bad / name).write_bytes(damage((bad / name).read_bytes()))
        with pytest.raises(MapsFileError, match="record and save it again") as err:
            AttentionMaps.load(bad)
        assert str(bad) in str(err.value)


def test_unet_layers_at_their_own_resolution(pipes):
    pipe = pipes("tiny-unet")
    with record(pipe, words=["red"]) as maps:
        generate(pipe, PROMPTS[:1], steps=1)
    assert maps.grids["down.0.0.0.cross"] == (16, 16) and maps.grids["mid.0.0.0.cross"] == (8, 8)
    assert maps.tensor(layer="mid.0.0.0.cross").shape[-2:] == (8, 8)
    assert maps.tensor().shape[-2:] == (16, 16)  # stacked: resized to the largest grid
    assert maps.word_map("red").shape == (16, 16)


@pytest.mark.parametrize("height,width", [(56, 128), (128, 56)])
def test_deep_unet_grids_at_non_square_sizes_come_from_the_real_shape(pipes, height, width):
    """An SD2.1-shaped UNet (3 cross-attention levels and a plain one; the tiny VAE halves the image): a
    28x64 latent halves, rounding up, to 14x32, 7x16 and 4x8 (the mid block). A grid guessed from the
    token count (32 at the mid block) would be 4x9. Every layer's grid is the real one, and its stored
    map is the reference's, pixel for pixel. (SD2.1 itself at 360x640: 45x80 -> 23x40 -> 12x20.)"""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = pipes("tiny-unet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
        attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    try:
        with record(pipe, words=["red"], heads="keep") as maps:
            generate(pipe, PROMPTS[:1], steps=1, height=height, width=width)
    finally:
        cap.close()
    lat = (height // 2, width // 2)
    levels = [lat]
    for _ in range(3):
        levels.append(tuple(-(-v // 2) for v in levels[-1]))  # ceil: a stride-2 conv with padding 1
    assert levels[3] == ((4, 8) if height < width else (8, 4))
    red = ad.word_positions(PROMPTS[0], "red")
    for site in sites:
        level = int(site.name.split(".")[1])
        want = levels[level] if site.name.startswith("down") else levels[3 - level] if site.name.startswith("up") else levels[3]
        assert maps.grids[site.name] == want, site.name
        args, kwargs, tl = cap.calls[site.path][0]
        ref = reference_probs("cross", ad.module(site), args, kwargs, tl).chunk(2)[1]  # the cond rows
        ref = ref[..., red["clip"]].sum(-1).reshape(1, -1, *want)  # (batch, head, y, x)
        got = maps.tensor("red", layer=site.name)[0, 0, 0, :, :, 0]  # (batch, head, y, x)
        assert (got - ref).abs().max().item() < 1e-5, site.name
    with record(pipe, words=["red"]) as maps:  # heads averaged: every layer stacks at the largest grid
        generate(pipe, PROMPTS[:1], steps=1, height=height, width=width)
    assert maps.word_map("red").shape == levels[0]


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-sd3.5"])
def test_skip_layer_guidance_call_is_kept_apart_from_the_cfg_branches(pipes, name):
    """With skip_guidance_layers the SD3 pipeline calls the transformer a second time per step (the
    conditional rows, some blocks skipped). Both branches of 2 prompts must equal the reference of the
    step's CFG call; the extra call must not be averaged in or take the CFG rows' places."""
    pipe = pipes(name)
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    cap = InputCapture(ad.denoiser, [s.path for s in sites])
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    try:
        with record(pipe, tokens=list(range(32)), heads="keep", branch="both") as maps:
            generate(pipe, PROMPTS, steps=3, **slg)
    finally:
        cap.close()
    assert len(cap.calls[sites[-1].path]) == 5  # 3 CFG calls, and the skip-layer calls at steps 1 and 2
    worst = 0.0
    for site in sites:
        calls = cap.calls[site.path]  # the skipped block 0 runs no attention in the extra calls
        got = maps.tensor(layer=site.name, branch=None)[:, 0].flatten(-2)  # (step, branch, batch, head, token, n)
        step_calls = [c for c in calls if c[1]["hidden_states"].shape[0] == 4]  # the CFG calls: 2 x 2 rows
        assert len(step_calls) == 3
        for step, (args, kwargs, tl) in enumerate(step_calls):
            ref = reference_probs(_ref_kind(site), ad.module(site), args, kwargs, tl)
            ref = torch.stack(ref.chunk(2)).transpose(-1, -2)  # (branch, batch, head, text, n)
            worst = max(worst, (got[step] - ref).abs().max().item())
    assert worst < 1e-5, worst


def test_pipelines_whose_calls_would_be_misread_are_refused(pipes):
    from diffusers import HeunDiscreteScheduler, StableDiffusion3PAGPipeline

    base = pipes("tiny-unet")
    heun = type(base)(**{**base.components, "scheduler": HeunDiscreteScheduler.from_config(base.scheduler.config)})
    with pytest.raises(ValueError, match="HeunDiscreteScheduler is of order 2.*first-order scheduler"):
        record(heun, words=["red"]).__enter__()
    sd3 = pipes("tiny-sd3")
    parts = {k: v for k, v in sd3.components.items() if k not in ("image_encoder", "feature_extractor")}
    pag = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=["blocks.0"])
    with pytest.raises(ValueError, match="perturbed-attention-guidance pipeline.*StableDiffusion3Pipeline"):
        record(pag, words=["red"]).__enter__()


def test_a_repeated_word_records_the_occurrence_asked_for(pipes):
    """'first' (the default), the k-th, or 'all': the sum of every occurrence's maps."""
    pipe = pipes("tiny-unet")
    prompt = "a red car and a red hat"
    got = {}
    for occ in ("first", 2, "all"):
        with record(pipe, words=["red"], occurrence=occ) as maps:
            generate(pipe, [prompt], steps=1)
        got[occ] = maps.tensor("red")
    with record(pipe, tokens=[2, 6]) as maps:  # "red" sits at positions 2 and 6 of this prompt (BOS at 0)
        generate(pipe, [prompt], steps=1)
    first, second = maps.tensor(2), maps.tensor(6)
    assert torch.allclose(got["first"], first) and torch.allclose(got[2], second)
    assert not torch.allclose(first, second)
    assert torch.allclose(got["all"], first + second, atol=1e-7)
    with pytest.raises(ValueError, match="occurrence must be"):
        record(pipe, words=["red"], occurrence=0).__enter__()


# ----- bad input -----
def test_unknown_layer_lists_what_exists(pipes):
    with pytest.raises(KeyError, match=r"unknown layer 'block\.09\.joint'.*block\.00\.joint, block\.01\.joint"):
        record(pipes("tiny-sd3"), words=["red"], layers=["block.09.joint"]).__enter__()
    with pytest.raises(IndexError, match="layer index 12 out of range"):
        record(pipes("tiny-flux"), words=["red"], layers=[12]).__enter__()


def test_image_only_layer_is_labelled_and_refused(pipes):
    pipe = pipes("tiny-sd3.5")
    ad = get_adapter(pipe)
    image_only = [s for s in ad.sites() if not s.has_text]
    assert [s.name for s in image_only] == ["block.00.image"] and "image-only" in image_only[0].note
    assert "block.00.joint" in [s.name for s in ad.sites(recordable_only=True)]
    with pytest.raises(ValueError, match="image-only self-attention"):
        record(pipe, words=["red"], layers="block.00.image").__enter__()
    # a glob that covers it records only the joint layers
    with record(pipe, words=["red"], layers="block.00.*") as maps:
        generate(pipe, PROMPTS[:1], steps=1)
    assert maps.layers == ["block.00.joint"]


def test_step_out_of_range(pipes):
    with pytest.raises(IndexError, match=r"step 7 out of range: this generation has 3 denoising steps"):
        with record(pipes("tiny-unet"), words=["red"], steps=[7]):
            generate(pipes("tiny-unet"), PROMPTS[:1], steps=3)


def test_word_not_in_prompt_lists_tokens(pipes):
    with pytest.raises(KeyError, match=r"word 'bus' is not in prompt 'a red car on a blue background'.*'red</w>'"):
        with record(pipes("tiny-sd3"), words=["bus"]):
            generate(pipes("tiny-sd3"), PROMPTS[:1], steps=1)


def test_empty_prompt_is_refused_for_words(pipes):
    with pytest.raises(ValueError, match="prompt is empty"):
        with record(pipes("tiny-unet"), words=["red"]):
            generate(pipes("tiny-unet"), [""], steps=1)


def test_prompt_embeds_without_prompt_needs_prompt_or_indices(pipes):
    pipe = pipes("tiny-unet")
    ad = get_adapter(pipe)
    cond = ad.encode_prompt(["a red car"], do_cfg=True)
    kw = dict(prompt_embeds=cond.embeds, negative_prompt_embeds=cond.neg_embeds)
    with pytest.raises(ValueError, match=r"Pass prompt=\.\.\. to record"):
        with record(pipe, words=["red"]):
            generate(pipe, None, steps=1, **kw)
    with record(pipe, words=["red"], prompt="a red car") as maps:
        generate(pipe, None, steps=1, **kw)
    assert maps.prompts == ["a red car"]


def test_nothing_to_record_and_bad_options(pipes):
    with pytest.raises(ValueError, match="nothing to record"):
        record(pipes("tiny-sd3")).__enter__()
    with pytest.raises(ValueError, match="branch must be"):
        record(pipes("tiny-sd3"), words=["red"], branch="cfg").__enter__()
    with pytest.raises(ValueError, match="heads must be"):
        record(pipes("tiny-sd3"), words=["red"], heads="max").__enter__()


def test_attention_backend_the_recorder_cannot_see(pipes):
    from diffusers.models.attention_processor import AttnProcessor  # classic: baddbmm, no SDPA

    pipe = pipes("tiny-unet")
    ad = get_adapter(pipe)
    site = ad.sites(recordable_only=True)[0]
    original = ad.module(site).processor
    ad.module(site).set_processor(AttnProcessor())
    try:
        with pytest.raises(RuntimeError, match="did not call torch.nn.functional.scaled_dot_product_attention"):
            with record(pipe, words=["red"], layers=[site.name]):
                generate(pipe, PROMPTS[:1], steps=1)
        assert type(ad.module(site).processor) is AttnProcessor
    finally:
        ad.module(site).set_processor(original)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-unet"])
def test_per_prompt_words_record_each_prompts_own_word(pipes, name):
    """words={label: [word per prompt]} equals summing the token indices of each prompt's word."""
    pipe = pipes(name)
    ad = get_adapter(pipe)
    words = ["blue", "giraffe"]  # 'giraffe' is split into pieces by every tiny tokenizer
    pos = [sorted(p for ps in ad.word_positions(pr, w).values() for p in ps) for pr, w in zip(PROMPTS, words)]
    with record(pipe, words={"thing": words}) as by_word:
        generate(pipe, PROMPTS, steps=2)
    with record(pipe, tokens=sorted({*pos[0], *pos[1]})) as by_index:
        generate(pipe, PROMPTS, steps=2)
    assert [t["label"] for t in by_word.tokens] == ["thing"] * len(by_word.tokens)
    got = by_word.tensor("thing")[:, :, 0, :, 0, 0]  # (step, layer, batch, y, x)
    for item, p in enumerate(pos):
        want = by_index.tensor([f"#{i}" for i in p])[:, :, 0, item, 0].sum(dim=2)  # (step, layer, y, x)
        torch.testing.assert_close(got[:, :, item], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one word per prompt"):
        with record(pipe, words={"thing": ["blue"]}):
            generate(pipe, PROMPTS, steps=1)


# ----- word/token positions -> weights, pure -----
def test_token_weights_map_each_rows_positions_to_their_columns():
    from dit_probe.attention.recorder import token_weights

    # row 0: a word split into positions 3 and 4, and token index 9; row 1: the word at 5, index 9 absent
    cols, w = token_weights([[[3, 4], [9]], [[5], []]], n_targets=2)
    assert cols.tolist() == [3, 4, 5, 9]
    assert w.tolist() == [[[1, 1, 0, 0], [0, 0, 0, 1]], [[0, 0, 1, 0], [0, 0, 0, 0]]]
    # as the recorder applies them: a split word's map is the sum of its pieces' probabilities
    probs = torch.tensor([[[[0.1, 0.2, 0.3, 0.4]]], [[[0.5, 0.6, 0.7, 0.8]]]])  # (rows, heads, n, cols)
    maps = torch.einsum("rhnc,rtc->rhtn", probs, w)
    assert torch.allclose(maps[:, 0, :, 0], torch.tensor([[0.1 + 0.2, 0.4], [0.7, 0.0]]))
    cols, w = token_weights([], n_targets=2)  # a call with no selected rows
    assert cols.tolist() == [] and w.shape == (0, 2, 0)


# ----- processors: swapped with set_processor, every one restored -----
@pytest.mark.parametrize("name", FAMILIES)
def test_each_module_gets_its_own_original_processor_object_back_after_an_exception(pipes, name):
    pipe = pipes(name)
    ad = get_adapter(pipe)
    mods = {s.path: ad.module(s) for s in ad.sites()}
    before = {path: m.processor for path, m in mods.items()}
    with pytest.raises(ZeroDivisionError):
        with record(pipe, words=["red"], layers=[s.name for s in ad.sites(recordable_only=True)]):
            assert all(mods[s.path].processor is not before[s.path] for s in ad.sites(recordable_only=True))
            generate(pipe, PROMPTS[:1], steps=1)
            raise ZeroDivisionError("raised inside the context")
    for path, m in mods.items():
        assert m.processor is before[path], path


def test_failure_while_entering_undoes_the_swaps_already_made(pipes):
    pipe = pipes("tiny-sd3")
    ad = get_adapter(pipe)
    sites = ad.sites(recordable_only=True)
    before = [ad.module(s).processor for s in sites]
    second = ad.module(sites[1])

    def refuse(processor):
        raise RuntimeError("cannot set this processor")

    second.set_processor = refuse  # an instance attribute: the class's method is back after del
    try:
        with pytest.raises(RuntimeError, match="cannot set this processor"):
            record(pipe, words=["red"]).__enter__()
    finally:
        del second.set_processor
    assert [ad.module(s).processor for s in sites] == before
    assert all(ad.module(s).processor is p for s, p in zip(sites, before))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert "encode_prompt" not in pipe.__dict__
    assert not ad.denoiser._forward_pre_hooks


def test_a_processor_that_is_an_nn_module_is_swapped_and_restored(pipes):
    """Processors with weights (IP-adapter ones) are child modules of the attention module; swapping
    them by plain attribute assignment fails, diffusers' set_processor handles them."""

    class WeightedProcessor(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw) * self.gain

    pipe = pipes("tiny-unet")
    ad = get_adapter(pipe)
    site = ad.sites(recordable_only=True)[0]
    mod = ad.module(site)
    original = mod.processor
    weighted = WeightedProcessor(original)
    mod.set_processor(weighted)
    try:
        with record(pipe, words=["red"], layers=[site.name]) as maps:
            generate(pipe, PROMPTS[:1], steps=1)
        assert maps.tensor().shape[1] == 1
        assert mod.processor is weighted and mod._modules["processor"] is weighted  # registered again
    finally:
        mod.set_processor(original)
