"""Editing evaluation: LPIPS, the graded-edit score, the ZOPIE-style format and runner, and the install."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from dit_probe.metrics.graded import graded_edit_score, graded_steps
from dit_probe.metrics.lpips import LPIPS, _linear_weights
from dit_probe.studies import benchmark as bm
from dit_probe.toyworld import BACKGROUNDS, Judge


@pytest.fixture(scope="module")
def lpips():
    with pytest.warns(UserWarning, match="for tests only"):
        return LPIPS("random", seed=0)


# ----- LPIPS -----
def test_lpips_is_zero_on_identical_images_symmetric_and_grows_with_noise(lpips):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_array_equal(lpips.distance(a, a), 0.0)
    previous = np.zeros(3)
    for sigma in (5, 20, 60):
        b = np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)
        d = lpips.distance(a, b)
        np.testing.assert_allclose(d, lpips.distance(b, a), rtol=1e-6)
        assert (d > previous).all()
        previous = d


def test_lpips_equals_a_direct_computation_and_masks(lpips):
    """The sum over AlexNet stages of the spatial mean of w . (unit-normalised feature difference)^2."""
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8) for _ in range(2))
    x, y = (torch.from_numpy(v.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2) for v in (a, b))
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, total = (x - shift) / scale, (y - shift) / scale, torch.zeros(2)
    weights = _linear_weights()
    for stage, (lo, hi) in enumerate([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]):
        hx, hy = lpips.features[lo:hi](hx), lpips.features[lo:hi](hy)
        nx, ny = hx / hx.norm(dim=1, keepdim=True), hy / hy.norm(dim=1, keepdim=True)
        w = weights[str(stage)].view(1, -1, 1, 1)
        total += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
    np.testing.assert_allclose(lpips.distance(a, b), total.numpy(), rtol=1e-4)
    mask = np.zeros((32, 32), bool)
    mask[:16] = True
    c = a.copy()
    c[:, 16:] = 255 - c[:, 16:]  # changed only outside the mask
    np.testing.assert_array_equal(lpips.distance(a, c, mask), 0.0)


def test_lpips_backbone_from_a_file_and_a_clear_error_without_one(tmp_path, lpips):
    from safetensors.torch import save_file

    state = {f"features.{k}": v.contiguous() for k, v in lpips.features.state_dict().items()}
    save_file({**state, "classifier.1.weight": torch.zeros(2, 2)}, str(tmp_path / "alexnet.safetensors"))
    loaded = LPIPS(tmp_path / "alexnet.safetensors")
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8) for _ in range(2))
    np.testing.assert_allclose(loaded.distance(a, b), lpips.distance(a, b), rtol=1e-6)
    save_file({"features.0.weight": state["features.0.weight"]}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lack .*features.0.bias"):
        LPIPS(tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        LPIPS(tmp_path / "missing.pth")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="torchvision does not import here.*backbone=PATH"):
            LPIPS()


# ----- graded-edit score -----
def test_graded_edit_score_counts_rising_consecutive_pairs():
    scores = np.array([[0.0, 0.3, 0.9, 0.95],   # rises, rises, rises: 3 of 3
                       [0.0, 0.01, 0.5, 0.5],   # too small, rises, flat: 1 of 3
                       [0.9, 0.5, 0.2, 0.1]])   # falls: 0 of 3
    assert graded_edit_score(scores, [0, 0.5, 1, 1.5]) == pytest.approx(100 * 4 / 9)
    np.testing.assert_array_equal(graded_steps(scores[:1], [1.5, 1, 0.5, 0])[0], [False, False, False])  # sorted by alpha
    with pytest.raises(ValueError, match="at least 2"):
        graded_steps(scores[:, :1], [0])


# ----- the format -----
def test_toy_benchmark_roundtrips_with_exact_masks(tmp_path):
    items = bm.toy_benchmark(per_class=1, seed=3)
    assert len(items) == 3 * 8 and len({it.id for it in items}) == 24
    bm.write_benchmark(tmp_path / "b", items)
    back = bm.read_benchmark(tmp_path / "b")
    for it, re in zip(items, back):
        np.testing.assert_array_equal(it.image, re.image)
        np.testing.assert_array_equal(it.background_mask, re.background_mask)
        assert (it.source_prompt, it.edit_prompt, it.target_value, it.roi) == (re.source_prompt, re.edit_prompt,
                                                                                re.target_value, re.roi)
        bg = np.array(BACKGROUNDS[Judge().read(it.image)[0]["background"]])
        assert (it.image[it.background_mask] == bg).all()  # the mask is exactly background
        x0, y0, x1, y1 = it.roi
        assert not (~it.background_mask[:y0]).any() and not (~it.background_mask[y1:]).any()  # ROI covers the object
        assert it.edit_prompt != it.source_prompt and it.target_value in it.edit_prompt.split()


def test_bad_benchmark_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(bm.BenchmarkFormatError, match="has no index.jsonl"):
        bm.read_benchmark(tmp_path)
    bm.write_benchmark(tmp_path / "b", bm.toy_benchmark(per_class=1)[:2])
    index = tmp_path / "b" / "index.jsonl"
    good = index.read_text().splitlines()
    rec = json.loads(good[1])
    for broken, message in (({k: v for k, v in rec.items() if k != "edit_prompt"}, "line 2 lacks \\['edit_prompt'\\]"),
                            ({**rec, "colour": 1}, "unknown keys \\['colour'\\]"),
                            ({**rec, "image": "images/none.png"}, "image 'images/none.png' does not exist"),
                            ({**rec, "id": json.loads(good[0])["id"]}, "repeats ids")):
        index.write_text(good[0] + "\n" + json.dumps(broken) + "\n")
        with pytest.raises(bm.BenchmarkFormatError, match=message):
            bm.read_benchmark(tmp_path / "b")
    index.write_text(good[0] + "\n{not json\n")
    with pytest.raises(bm.BenchmarkFormatError, match="line 2 is not JSON"):
        bm.read_benchmark(tmp_path / "b")
    with pytest.raises(ValueError, match="report_alpha 2"):
        bm.BenchmarkConfig(report_alpha=2).check()
    with pytest.raises(ValueError, match="needs clip"):
        bm.BenchmarkConfig(judge="clip").check()
    with pytest.raises(ValueError, match="'hsds-only/omit' is not available"):  # omitting captions: toy edits only
        bm.BenchmarkConfig(modes=["hsds-only/omit"]).check()
    no_targets = [bm.BenchmarkItem(**{**it.__dict__, "target_image": None}) for it in bm.toy_benchmark(per_class=1)[:2]]
    bm.write_benchmark(tmp_path / "c", no_targets)
    assert "target_image" not in (tmp_path / "c" / "index.jsonl").read_text()
    with pytest.raises(bm.BenchmarkFormatError, match="needs a target_image"):
        bm.run(bm.BenchmarkConfig(models=["toy-mmdit"], data=str(tmp_path / "c"), modes=["text+reference"]),
               out=tmp_path / "r", quiet=True)


# ----- the runner -----
def test_toy_benchmark_run(tmp_path):
    items = [it for it in bm.toy_benchmark(per_class=1, seed=0, features=("color", "size"))][::2]  # 8 edits
    bm.write_benchmark(tmp_path / "data", items)
    cfg = bm.BenchmarkConfig(models=["toy-mmdit"], data=str(tmp_path / "data"),
                             modes=["eim", "prompt-only", "text+reference"], alphas=[0.0, 1.0, 1.5])
    table = bm.run(cfg, out=tmp_path / "run", figures=tmp_path / "fig", log=lambda *a: None).set_index("mode")
    edits = pd.read_csv(tmp_path / "run" / "edits.csv")
    assert len(edits) == 24 and set(edits["mode"]) == {"eim", "prompt-only", "text+reference"}
    # the image side against the truth: the oracle's own direction has cosine 1, HSDS's is some other value,
    # the text-only mode has none
    cos = edits.groupby("mode").cos_ref
    assert np.allclose(cos.min()["text+reference"], 1) and np.allclose(cos.max()["text+reference"], 1)
    assert cos.max()["eim"] < 0.99 and edits[edits["mode"] == "prompt-only"].cos_ref.isna().all()
    for mode in ("eim", "prompt-only"):
        assert table.loc[mode, "judge_target"] >= 0.7  # the edits reach their targets
        assert table.loc[mode, "psnr"] > 15 and 0.3 < table.loc[mode, "ssim"] <= 1
    assert (edits.judge_target > edits.judge_start).mean() >= 0.7  # alpha 1 beats alpha 0
    # graded: the share of the two consecutive alpha steps where P(target) rises, so 0, 1/2 or 1 exactly
    assert set(edits.graded.round(9)) <= {0.0, 0.5, 1.0} and edits.lpips.isna().all() and edits.clip_score.isna().all()
    md = (tmp_path / "fig" / "benchmark-table2.md").read_text()
    assert "| eim | -4.40 * | toy-mmdit |" in md and "LPIPS: not computed" in md
    again = bm.run(cfg, out=tmp_path / "run", log=lambda *a: None)  # every unit on disk: read back, equal
    pd.testing.assert_frame_equal(again.set_index("mode"), table)


def test_default_install_pulls_no_torchvision_and_one_torch():
    """Walk dit_probe's installed requirements (with the dev extra): no torchvision, exactly one torch."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [("dit_probe", {"dev"})]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, set(req.extras)))
    assert "torchvision" not in seen and "torch" in seen
    torches = [d for d in metadata.distributions() if (d.metadata["Name"] or "").lower() == "torch"]
    assert len(torches) == 1
    out = subprocess.run([sys.executable, "-c", "import sys, dit_probe, dit_probe.studies.benchmark, dit_probe.metrics.lpips, "
                          "dit_probe.metrics.clip, dit_probe.editing; print('torchvision' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
