"""SSIM, SDE (Eq. 2), the CLIP judge and CLIPScore: known values and direct computations."""

import numpy as np
import pytest
import torch

from dit_probe.editing import EIMEditor
from dit_probe.metrics import ssim
from dit_probe.metrics.clip import Clip, ClipJudge, clip_score
from dit_probe.metrics.sde import sde, sde_terms
from dit_probe.tiny import tiny_clip


# ----- SSIM -----
def test_ssim_identical_is_one_and_falls_with_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    assert ssim(a, a)[0] == pytest.approx(1.0, abs=1e-6)
    values = [ssim(a, np.clip(a + rng.normal(0, s, a.shape), 0, 255))[0] for s in (5, 20, 60)]
    assert values[0] > values[1] > values[2]


def test_ssim_equals_torchmetrics_and_the_mask_reads_only_masked_pixels():
    from torchmetrics.functional.image import structural_similarity_index_measure

    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (2, 32, 32, 3))
    b = np.clip(a + rng.normal(0, 15, a.shape), 0, 255)
    ref = structural_similarity_index_measure(torch.from_numpy(b).permute(0, 3, 1, 2), torch.from_numpy(a).permute(0, 3, 1, 2),
                                              data_range=255.0, reduction="none")
    np.testing.assert_allclose(ssim(b, a), ref.numpy(), rtol=1e-6)
    # a change far outside the mask does not reach the masked value (the window is 11 px wide)
    mask = np.zeros((32, 32), bool)
    mask[:8, :8] = True
    c = a[0].copy()
    c[20:, 20:] = 0
    assert ssim(a[0], c, mask) == pytest.approx(1.0, abs=1e-6) and ssim(a[0], c) < 0.9
    assert np.isnan(ssim(a[0], c, np.zeros((32, 32), bool)))


# ----- SDE -----
def test_sde_known_distances_rms_and_l2():
    x = np.zeros((1, 4, 4, 3))
    x_hat, x_tilde = np.full_like(x, 0.1), np.full_like(x, 0.2)
    t = sde_terms(x, x_hat, x_tilde)
    assert t["kept"][0] == pytest.approx(0.1) and t["flipped"][0] == pytest.approx(0.2)
    assert t["sde"][0] == pytest.approx(0.1 / 0.2 + 0.2)
    t2 = sde_terms(x, x_hat, x_tilde, norm="l2")  # the Euclidean norm grows with sqrt(48 values)
    assert t2["sde"][0] == pytest.approx(0.5 + 0.2 * np.sqrt(48))
    u8 = sde_terms((x * 255).astype(np.uint8), (x_hat * 255).round().astype(np.uint8),
                   (x_tilde * 255).round().astype(np.uint8))  # uint8 is read as 0..255
    assert u8["sde"][0] == pytest.approx(round(25.5) / round(51) + round(51) / 255, rel=1e-6)


def test_sde_identical_reconstructions_and_bad_input():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 8, 8, 3))
    y = rng.uniform(size=(3, 8, 8, 3))
    perfect = sde_terms(x, x, y)  # c reconstructs x exactly: SDE is the flipped distance alone
    np.testing.assert_allclose(perfect["sde"], perfect["flipped"])
    same = sde_terms(x, y, y)  # c~ changes nothing relative to c: the ratio is 1
    np.testing.assert_allclose(same["ratio"], 1.0)
    np.testing.assert_allclose(same["sde"], 1.0 + same["flipped"])
    with pytest.raises(ValueError, match="one shape"):
        sde_terms(x, y[:2], y)
    with pytest.raises(ValueError, match="unknown norm"):
        sde_terms(x, y, y, norm="l1")


def test_sde_branches_share_the_forward_noise(pipes):
    editor = EIMEditor(pipes("tiny-sd3"), strength=0.6, num_inference_steps=5, guidance_scale=3.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    prompts = ["a red star", "a blue ring"]
    same = sde(editor, x, prompts, prompts, seeds=[3, 4])
    np.testing.assert_array_equal(same["x_hat"], same["x_tilde"])  # same noised latent, same prompt: identical
    np.testing.assert_allclose(same["ratio"], 1.0)
    res = sde(editor, x, prompts, ["a green star", "a blue square"], seeds=[3, 4])
    # the c~ branch equals encoding from scratch with the same seeds and denoising under c~
    enc = editor.encode(x, ["a green star", "a blue square"], [3, 4])
    np.testing.assert_array_equal(res["x_tilde"], editor.reconstruct(enc))
    np.testing.assert_array_equal(res["x_hat"], same["x_hat"])
    other = sde(editor, x, prompts, ["a green star", "a blue square"], seeds=[5, 6])
    assert not np.array_equal(other["x_hat"], res["x_hat"])  # the seed is the noise


# ----- CLIP -----
@pytest.fixture(scope="module")
def clip():
    model, tokenizer, processor = tiny_clip()
    return Clip(model, tokenizer, processor)


def _direct(clip, images, texts):
    pix = clip.processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = clip.model.get_image_features(pixel_values=pix)
        enc = clip.tokenizer(texts, padding=True, return_tensors="pt")
        txt = clip.model.get_text_features(**enc)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    return torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1)  # (images, texts)


def test_clip_score_equals_a_direct_cosine(clip):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    texts = ["a red star", "a photo of a smiling person", "blue"]
    cos = _direct(clip, images, texts).diagonal().numpy()
    np.testing.assert_allclose(clip_score(clip, images, texts), 100 * np.maximum(cos, 0), atol=1e-4)
    with pytest.raises(ValueError, match="one text per image"):
        clip_score(clip, images, texts[:2])


def test_clip_judge_is_a_softmax_over_value_prompts(clip):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    prompts = {"smiling": "a photo of a smiling person", "serious": "a photo of a serious person"}
    judge = ClipJudge({"expression": prompts}, clip)
    cos = _direct(clip, images, list(prompts.values()))
    expected = torch.softmax(clip.model.logit_scale.exp().item() * cos, -1).numpy()
    np.testing.assert_allclose(judge.scores(images)["expression"], expected, atol=1e-5)
    reads = judge.read(images)
    assert [r["expression"] for r in reads] == [list(prompts)[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(judge.score(images, "expression", "serious"), expected[:, 1], atol=1e-5)
    with pytest.raises(KeyError, match="knows the attributes expression"):
        judge.score(images, "hat", "yes")
    with pytest.raises(ValueError, match="at least two values"):
        ClipJudge({"hat": {"yes": "a hat"}}, clip)


def test_clip_loads_from_a_local_folder_and_says_what_is_missing(tmp_path, clip):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    clip.processor.save_pretrained(tmp_path / "clip")
    loaded = Clip(tmp_path / "clip")
    np.testing.assert_allclose(loaded.text_embeds(["a red star"]), clip.text_embeds(["a red star"]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="could not load a CLIP model"):
        Clip(tmp_path / "nothing-here")


def test_readings_equal_read_and_scores_for_both_judges(clip):
    from dit_probe.toyworld import Judge, render_many, scenes

    images = render_many(scenes(6, seed=4))
    clip_judge = ClipJudge({"expression": {"smiling": "a smiling person", "serious": "a serious person"}}, clip)
    for judge in (Judge(), clip_judge):
        reads, scores = judge.readings(images)
        assert reads == judge.read(images)
        for a, s in judge.scores(images).items():
            np.testing.assert_allclose(scores[a], s, atol=1e-6)
