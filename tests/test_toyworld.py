"""The shapes world and its judge: determinism, exact ground truth, judge accuracy, clear errors."""

import numpy as np
import pytest

from dit_probe.toyworld import ATTRIBUTES, BACKGROUNDS, COLORS, SHAPES, Judge, Scene, caption, render, scenes
from dit_probe.toyworld.judge import SIZE_THRESHOLD, accuracy_on_renders, size_threshold_from_renders
from dit_probe.toyworld.world import GENERIC_SHAPE, coverage, drop_pattern


def test_world_has_the_required_attribute_ranges():
    assert len(SHAPES) >= 6 and len(COLORS) >= 6 and len(BACKGROUNDS) >= 3
    assert ATTRIBUTES["size"] == ("small", "large")


def test_renderer_is_deterministic_from_the_seed():
    a, b = scenes(20, seed=5), scenes(20, seed=5)
    assert a == b
    assert scenes(20, seed=6) != a
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))


def test_render_ground_truth_is_exact():
    for s in scenes(40, seed=11):
        img = render(s).astype(int)
        cov = coverage(s)
        full, empty = cov == 1.0, cov == 0.0
        assert full.sum() > 20 and empty.sum() > 300
        assert (img[full] == COLORS[s.color]).all()  # inside: exactly the object colour
        assert (img[empty] == BACKGROUNDS[s.background]).all()  # outside: exactly the background
        # the object sits where the scene says (point-symmetric shapes: centroid == centre, up to
        # the 1/4-pixel grid of the 4x supersampling)
        if s.shape in ("circle", "square", "diamond", "cross", "ring"):
            ys, xs = np.mgrid[0:32, 0:32] + 0.5
            assert abs((cov * xs).sum() / cov.sum() - s.cx) < 0.15
            assert abs((cov * ys).sum() / cov.sum() - s.cy) < 0.15


def test_sizes_differ_in_extent():
    small = coverage(Scene("circle", "red", "small", "black"))
    large = coverage(Scene("circle", "red", "large", "black"))
    assert 2.5 < large.sum() / small.sum() < 3.5  # (12/7)^2 = 2.9


def test_caption_template_and_dropout():
    attrs = dict(shape="star", color="red", size="large", background="white")
    assert caption(attrs) == "a large red star on a white background"
    assert caption(attrs, drop=("size", "background")) == "a red star"
    assert caption(attrs, drop=("shape",)) == f"a large red {GENERIC_SHAPE} on a white background"
    import random

    rng = random.Random(0)
    pats = [drop_pattern(rng) for _ in range(4000)]
    assert 0.08 < sum(p is None for p in pats) / len(pats) < 0.12  # whole caption ~10%
    kept = [p for p in pats if p is not None]
    for a in ATTRIBUTES:
        assert 0.22 < sum(a in p for p in kept) / len(kept) < 0.28  # each word ~25%


def test_bad_scene_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown color 'mauve'.*known: red"):
        Scene("circle", "mauve", "small", "black")


@pytest.fixture(scope="module")
def judge():
    return Judge()


def test_judge_reads_held_out_renders(judge):
    acc = accuracy_on_renders(judge, n=400, seed=424242)
    assert all(v >= 0.98 for v in acc.values()), acc


def test_size_cut_off_is_the_stated_rule_on_renders():
    # the cut-off is not fitted to generations: it is the midpoint of the rendered extents, on fresh renders too
    assert SIZE_THRESHOLD == size_threshold_from_renders()
    assert size_threshold_from_renders(n=2000, seed=31337) == SIZE_THRESHOLD


def test_judge_is_robust_to_blur_and_noise(judge):
    """Generated images are not clean renders: the judge must read mildly degraded ones too."""
    import torch

    items = scenes(200, seed=777)
    x = torch.from_numpy(np.stack([render(s) for s in items])).float().permute(0, 3, 1, 2)
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1) * 0.5 + x * 0.5
    x = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 6).clamp(0, 255)
    got = judge.read(x.permute(0, 2, 3, 1).numpy().astype(np.uint8))
    for a in ATTRIBUTES:
        assert np.mean([g[a] == getattr(s, a) for g, s in zip(got, items)]) >= 0.95, a


def test_judge_soft_scores(judge):
    items = scenes(30, seed=3)
    imgs = np.stack([render(s) for s in items])
    sc = judge.scores(imgs)
    for a, values in ATTRIBUTES.items():
        assert sc[a].shape == (30, len(values))
        np.testing.assert_allclose(sc[a].sum(1), 1.0, atol=1e-5)
    true_color = judge.score(imgs, "color", items[0].color)[0]
    assert true_color > 0.9
    # float images in 0..1 read the same as uint8
    assert judge.read(imgs / 255.0) == judge.read(imgs)
    # a blank image: no object, so colour/shape/size are None and their scores uniform
    blank = np.full((1, 32, 32, 3), 128, np.uint8)
    assert judge.read(blank)[0] == {"shape": None, "color": None, "size": None, "background": "gray"}
    np.testing.assert_allclose(judge.scores(blank)["color"], 1 / len(COLORS))


def test_judge_bad_input(judge):
    img = render(scenes(1, seed=0)[0])
    with pytest.raises(ValueError, match="32x32"):
        judge.read(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(KeyError, match="knows the attributes"):
        judge.score(img, "texture", "smooth")
    with pytest.raises(KeyError, match="unknown color 'mauve'"):
        judge.score(img, "color", "mauve")


def test_tiny_tokenizers_are_the_same_in_every_process():
    """The tiny CLIP vocabulary and merges (and so every token id) must not depend on the process: the
    tokenizers trainer broke merge ties in hash order, which gave different ids in fresh processes."""
    import subprocess
    import sys

    code = ("import hashlib, json; from dit_probe.tiny import clip_tokenizer; t = clip_tokenizer(); "
            "print(hashlib.sha256(json.dumps([sorted(t.get_vocab().items()), t('a red car on a purple sky').input_ids])"
            ".encode()).hexdigest())")
    env = {**__import__("os").environ, "PYTHONHASHSEED": "random"}
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
            for _ in range(4)}
    assert len(seen) == 1, seen
    from dit_probe.tiny import clip_tokenizer

    tok = clip_tokenizer()
    assert all(len(tok.tokenize(w)) == 1 for w in ("red", "background", "a", "diamond"))  # listed words: one token
    assert tok.tokenize("purple") != ["purple</w>"] and len(tok.tokenize("purple")) > 1


def test_judge_segmentation_is_the_object_on_renders():
    """On renders the judge's segmentation is the exact mask up to anti-aliased edge pixels; on a blank image
    it finds nothing."""
    items = scenes(40, seed=10_600_000)
    seg = Judge.segment(np.stack([render(s) for s in items]))
    exact = np.stack([coverage(s) >= 0.5 for s in items])
    iou = (seg & exact).sum((1, 2)) / (seg | exact).sum((1, 2))
    assert iou.min() > 0.85 and iou.mean() > 0.93, (iou.min(), iou.mean())
    blank = np.full((1, 32, 32, 3), 128, np.uint8)
    assert not Judge.segment(blank).any()
