"""Adapters: layer names, word -> token mapping, CFG layout, and the model maths."""

import pytest
import torch

from dit_probe import get_adapter
from dit_probe.tiny import SPLIT_WORDS, clip_tokenizer

from .conftest import FAMILIES, generate


def test_canonical_layer_names(pipes):
    assert [s.name for s in get_adapter(pipes("tiny-sd3")).sites()] == ["block.00.joint", "block.01.joint", "block.02.joint"]
    names35 = [s.name for s in get_adapter(pipes("tiny-sd3.5")).sites()]
    assert names35 == ["block.00.joint", "block.00.image", "block.01.joint", "block.02.joint"]
    assert [s.name for s in get_adapter(pipes("tiny-flux")).sites()] == ["double.00.joint", "single.00.joint", "single.01.joint"]
    unet = [s.name for s in get_adapter(pipes("tiny-unet")).sites()]
    assert unet[:2] == ["down.0.0.0.self", "down.0.0.0.cross"] and unet[-1] == "up.1.1.0.cross"
    cross = [s.name for s in get_adapter(pipes("tiny-unet")).sites(recordable_only=True)]
    assert cross[0] == "down.0.0.0.cross" and "mid.0.0.0.cross" in cross and len(cross) == 7
    assert [n.replace(".self", ".cross") for n in unet if n.endswith(".self")] == cross  # attn1 beside each attn2


def test_one_piece_words_in_every_stream(pipes):
    prompt = "a red car on a blue background"
    sd3 = get_adapter(pipes("tiny-sd3")).word_positions(prompt, "car", text_len=32)
    assert sd3 == {"clip": [3], "t5": [16 + 2]}  # CLIP: <bos> a red car; T5: a red car (offset 16)
    assert get_adapter(pipes("tiny-flux")).word_positions(prompt, "car", text_len=16) == {"t5": [2]}
    assert get_adapter(pipes("tiny-unet")).word_positions(prompt, "car") == {"clip": [3]}


def test_multi_piece_words_take_every_piece(pipes):
    prompt = "a purple giraffe on a bicycle"
    ad = get_adapter(pipes("tiny-sd3"))
    toks = ad.tokens(prompt, text_len=32)
    pos = ad.word_positions(prompt, "giraffe", text_len=32)
    clip_pieces = [toks["clip"][p] for p in pos["clip"]]
    t5_pieces = [toks["t5"][p - 16] for p in pos["t5"]]
    assert len(clip_pieces) > 1 and "".join(clip_pieces).replace("</w>", "") == "giraffe"
    assert t5_pieces == ["▁" + SPLIT_WORDS["giraffe"][0], SPLIT_WORDS["giraffe"][1]]
    # the word's pieces are contiguous and nothing of its neighbours is included
    assert pos["clip"] == list(range(pos["clip"][0], pos["clip"][-1] + 1))
    # phrases map too, and matching is case-insensitive and whole-word
    assert ad.word_positions("A Red car", "red car", text_len=32)["clip"] == [2, 3]
    with pytest.raises(KeyError):
        ad.word_positions("a redcar", "red", text_len=32)


def test_word_not_in_prompt_error_lists_the_tokens(pipes):
    ad = get_adapter(pipes("tiny-flux"))
    with pytest.raises(KeyError) as err:
        ad.word_positions("a red car", "bus", text_len=16)
    assert "word 'bus' is not in prompt 'a red car'" in str(err.value) and "'▁red'" in str(err.value)


def test_truncated_word_is_missing(pipes):
    ad = get_adapter(pipes("tiny-unet"))  # CLIP: 16 positions incl. <bos>/<eos>
    prompt = "a red car " * 6 + "giraffe"
    with pytest.raises(KeyError, match="truncated"):
        ad.word_positions(prompt, "giraffe")


def test_tokenizer_builds_the_clip_vocab_layout():
    tok = clip_tokenizer()
    vocab = tok.get_vocab()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_branch_layout(pipes, name):
    """SD3 and SD batch [uncond | cond]; Flux runs cond then uncond as separate calls."""
    from dit_probe import record

    pipe = pipes(name)
    with record(pipe, tokens=[1], branch="both") as maps:
        generate(pipe, ["a red car"], steps=1)
    # the uncond branch attends to the negative/empty prompt: its maps differ from the cond ones
    t = maps.tensor()
    assert maps.branches == ["uncond", "cond"] and t.shape[2] == 2
    assert not torch.allclose(t[:, :, 0], t[:, :, 1])
    with record(pipe, tokens=[1]) as cond_only:
        generate(pipe, ["a red car"], steps=1)
    assert torch.equal(cond_only.tensor()[:, :, 0], t[:, :, 1])


# ----- model maths -----
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-unet", "tiny-flux", "tiny-pixart", "tiny-sdxl"])
def test_conversions_are_consistent(pipes, name):
    ad = get_adapter(pipes(name))
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = ad.set_timesteps(10)[3]
    z = ad.add_noise(x0, eps, t)
    v = ad.to_v(x0, eps, t)
    if ad.family != "sd3" and ad.family != "flux" and ad.prediction_type == "epsilon":
        out = eps
    else:
        out = v
    assert torch.allclose(ad.to_x0(out, z, t), x0, atol=1e-9)
    assert torch.allclose(ad.to_eps(out, z, t), eps, atol=1e-9)
    # log-SNR falls as the timestep (noise level) rises
    ts = ad.set_timesteps(10)
    snr = torch.stack([ad.log_snr(t) for t in ts])
    assert torch.all(snr[1:] > snr[:-1])


def test_strength_maps_to_different_noise_levels_across_families(pipes):
    """docs/design.md, section 2: SD3 (shift 3) at strength 0.75 is much noisier than SD2.1 at 0.75."""
    sd3, unet = get_adapter(pipes("tiny-sd3")), get_adapter(pipes("tiny-unet"))
    t_sd3, t_unet = sd3.set_timesteps(50, 0.75)[0], unet.set_timesteps(50, 0.75)[0]
    assert abs(float(sd3.sigma(t_sd3)) - 0.90) < 0.01
    assert abs(float(unet.log_snr(t_unet).exp()) - 0.076) < 0.01
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sd3.set_timesteps(50, 1.5)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-unet", "tiny-flux", "tiny-pixart", "tiny-sdxl"])
def test_adapter_loop_reproduces_the_pipeline(pipes, name):
    """encode_prompt + set_timesteps + predict + step, written with the adapter, give the pipeline's latents."""
    pipe = pipes(name)
    ad = get_adapter(pipe)
    g = torch.Generator().manual_seed(3)
    shape = (1, 4, 16, 16)
    init = torch.randn(shape, generator=g)
    steps = 3
    if ad.family == "flux":
        packed = ad.pack(init)
        ref = pipe("a red car", latents=packed, height=32, width=32, num_inference_steps=steps, guidance_scale=3.5,
                   max_sequence_length=16, output_type="latent").images
        cond = ad.encode_prompt("a red car", do_cfg=False, max_sequence_length=16)
        z = packed
        for t in ad.set_timesteps(steps, image_seq_len=packed.shape[1]):
            z = ad.step(ad.predict(z, t, cond, guidance_scale=3.5, grid=(8, 8)), t, z)
    else:
        kw = {"max_sequence_length": 16} if ad.family in ("sd3", "pixart") else {}
        call = {"use_resolution_binning": False, "clean_caption": False} if ad.family == "pixart" else {}
        sigma0 = pipe.scheduler.init_noise_sigma if ad.family == "unet" else 1.0
        ref = pipe("a red car", latents=init * sigma0, height=32, width=32, num_inference_steps=steps,
                   guidance_scale=4.0, output_type="latent", **kw, **call).images
        cond = ad.encode_prompt("a red car", do_cfg=True, **kw)
        z = init * sigma0
        for t in ad.set_timesteps(steps):
            z = ad.step(ad.predict(z, t, cond, guidance_scale=4.0), t, z)
    # the random tiny PixArt's DPM-Solver++ latents reach hundreds: there the bound is float32's, relative
    tol = 1e-6 * float(ref.abs().max()) if ad.family == "pixart" else 1e-5
    assert torch.allclose(z, ref, atol=tol, rtol=0), (z - ref).abs().max()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-unet"])
@pytest.mark.parametrize("steps,strength", [(25, 0.75), (50, 0.75), (10, 0.33), (7, 1.0)])
def test_edit_timesteps_match_the_diffusers_img2img_pipeline(pipes, name, steps, strength):
    import diffusers

    pipe = pipes(name)
    ad = get_adapter(pipe)
    ours = ad.set_timesteps(steps, strength, latents=torch.zeros(1, 4, 16, 16))
    i2i = getattr(diffusers, type(pipe).__name__.replace("Pipeline", "Img2ImgPipeline"))(**pipe.components)
    ad.set_timesteps(steps, 1.0, latents=torch.zeros(1, 4, 16, 16))  # the scheduler as the pipeline sets it
    theirs, n = i2i.get_timesteps(steps, strength, "cpu")
    assert torch.equal(ours, theirs) and len(ours) == n


# ----- word -> token positions, pure: token lists built by hand, no model -----
from dit_probe.adapters import StreamTokens, locate_word  # noqa: E402

# "a red giraffe": CLIP-like (BOS at position 0, EOS, padding with the EOS token) and T5-like
# (no BOS) streams; the T5 stream sits after 8 CLIP positions in the denoiser's text sequence.
GIRAFFE = "a red giraffe"
CLIP = StreamTokens(
    "clip", 0,
    ["<|startoftext|>", "a</w>", "red</w>", "gir", "affe</w>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"],
    [(0, 0), (0, 1), (2, 5), (6, 9), (9, 13), (0, 0), (0, 0), (0, 0)],
    pad="<|endoftext|>",
)
T5 = StreamTokens(
    "t5", 8,
    ["▁a", "▁red", "▁gir", "affe", "</s>", "<pad>", "<pad>"],
    [(0, 1), (2, 5), (6, 9), (9, 13), (0, 0), (0, 0), (0, 0)],
    pad="<pad>",
)


def test_locate_word_counts_the_bos_token_and_the_stream_offset():
    # CLIP: <bos> a red -> 2 (not 1: BOS is a position); T5: offset 8 + index 1 -> 9 (not 1)
    assert locate_word(GIRAFFE, "red", [CLIP, T5]) == {"clip": [2], "t5": [9]}
    assert locate_word(GIRAFFE, "a", [CLIP, T5]) == {"clip": [1], "t5": [8]}
    assert locate_word(GIRAFFE, "RED", [T5]) == {"t5": [9]}  # case-insensitive


def test_locate_word_split_word_takes_every_piece_or_is_refused():
    assert locate_word(GIRAFFE, "giraffe", [CLIP, T5]) == {"clip": [3, 4], "t5": [10, 11]}
    assert locate_word(GIRAFFE, "red giraffe", [CLIP]) == {"clip": [2, 3, 4]}
    with pytest.raises(ValueError, match=r"splits 'giraffe'.*'gir', 'affe</w>'.*'▁gir', 'affe'"):
        locate_word(GIRAFFE, "giraffe", [CLIP, T5], split_words="refuse")
    with pytest.raises(ValueError, match="splits 'red giraffe'"):
        locate_word(GIRAFFE, "red giraffe", [CLIP], split_words="refuse")
    # one token per word is not a split, also for a phrase
    assert locate_word(GIRAFFE, "a red", [CLIP, T5], split_words="refuse") == {"clip": [1, 2], "t5": [8, 9]}
    with pytest.raises(ValueError, match="split_words must be"):
        locate_word(GIRAFFE, "red", [CLIP], split_words="max")


def test_locate_word_repeated_word_is_its_first_occurrence():
    prompt = "a red car and a red hat"
    words = ["a", "red", "car", "and", "a", "red", "hat"]
    spans = [(0, 1), (2, 5), (6, 9), (10, 13), (14, 15), (16, 19), (20, 23)]
    clip = StreamTokens("clip", 0, ["<|startoftext|>"] + [w + "</w>" for w in words] + ["<|endoftext|>"],
                        [(0, 0)] + spans + [(0, 0)])
    assert locate_word(prompt, "red", [clip]) == {"clip": [2]}  # not [6], not [2, 6]
    assert locate_word(prompt, "red hat", [clip]) == {"clip": [6, 7]}  # the phrase occurs once, later
    # the other choices: every occurrence, or the k-th
    assert locate_word(prompt, "red", [clip], occurrence="all") == {"clip": [2, 6]}
    assert locate_word(prompt, "red", [clip], occurrence=2) == {"clip": [6]}
    assert locate_word(prompt, "a", [clip], occurrence=1) == {"clip": [1]}
    assert locate_word(prompt, "red", [clip], occurrence="all", split_words="refuse") == {"clip": [2, 6]}
    with pytest.raises(KeyError, match="occurs 2 time.*occurrence=3 does not exist"):
        locate_word(prompt, "red", [clip], occurrence=3)
    for bad in (0, -1, "last", True, 1.5):
        with pytest.raises(ValueError, match="occurrence must be"):
            locate_word(prompt, "red", [clip], occurrence=bad)


def test_locate_word_absent_word_is_a_clear_error():
    with pytest.raises(KeyError) as err:
        locate_word(GIRAFFE, "bus", [CLIP, T5])
    msg = str(err.value)
    assert "word 'bus' is not in prompt 'a red giraffe'" in msg
    assert "clip: ['<|startoftext|>', 'a</w>', 'red</w>', 'gir', 'affe</w>']" in msg  # padding dropped
    assert "t5: ['▁a', '▁red', '▁gir', 'affe', '</s>']" in msg
    with pytest.raises(KeyError, match="'gir' is not in prompt"):  # whole words only: not inside 'giraffe'
        locate_word(GIRAFFE, "gir", [CLIP, T5])
    with pytest.raises(ValueError, match="prompt is empty"):
        locate_word("  ", "red", [CLIP])


def test_locate_word_truncated_in_one_stream_only_keeps_the_other():
    clip = StreamTokens("clip", 0, ["<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>"],
                        [(0, 0), (0, 1), (2, 5), (0, 0)])  # 'giraffe' truncated away
    assert locate_word(GIRAFFE, "giraffe", [clip, T5]) == {"t5": [10, 11]}
    with pytest.raises(KeyError, match="truncated"):
        locate_word(GIRAFFE, "giraffe", [clip])


def test_word_positions_is_locate_word_on_the_pipelines_tokenization(pipes):
    ad = get_adapter(pipes("tiny-sd3"))
    prompt = "a purple giraffe on a bicycle"
    streams = ad.tokenize(prompt, text_len=32)
    assert [(s.name, s.offset, len(s.tokens)) for s in streams] == [("clip", 0, 16), ("t5", 16, 16)]
    assert ad.word_positions(prompt, "giraffe", text_len=32) == locate_word(prompt, "giraffe", streams)
    assert ad.tokens(prompt, text_len=32) == {s.name: s.visible() for s in streams}


@pytest.mark.parametrize("name", FAMILIES)
def test_denoiser_call_arguments_are_read_by_the_adapter(pipes, name):
    """The recorder asks the adapter for the latent input: 'sample' for UNets (often positional),
    'hidden_states' for transformers."""
    ad = get_adapter(pipes(name))
    x = torch.zeros(3, 4, 8, 8)
    key = "sample" if ad.family in ("unet", "sdxl") else "hidden_states"
    assert ad.latent_input((), {key: x}) is x and ad.latent_input((x,), {}) is x
    assert ad.batch_rows((), {key: x, "encoder_hidden_states": torch.zeros(1, 5, 2)}) == 3
    assert ad.encoded_prompt(("a red car",), {}) == "a red car" == ad.encoded_prompt((), {"prompt": "a red car"})
