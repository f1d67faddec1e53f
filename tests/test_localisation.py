"""The localisation study's scores by hand, and the study through the runner on toy-mmdit (every read-out)."""

import re

import numpy as np

from dit_probe.studies import STUDIES
from sklearn.metrics import roc_auc_score

from dit_probe.studies.localisation import auroc, otsu_threshold, score_map


def test_scores_of_known_maps():
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    perfect = mask.astype(float) + 0.01 * np.random.default_rng(0).random((8, 8))
    s = score_map(perfect, mask)
    assert s["auroc"] == 1.0 and s["ap"] == 1.0 and s["iou"] == 1.0 and s["pointing"] and s["area"] == 9 / 64
    inverted = score_map(-perfect, mask)
    assert inverted["auroc"] == 0.0 and not inverted["pointing"] and inverted["iou"] == 0.0
    flat_but_one = np.zeros((8, 8))
    flat_but_one[0, 0] = 1.0
    assert not score_map(flat_but_one, mask)["pointing"]


def test_otsu_splits_two_groups():
    values = np.concatenate([np.full(50, 0.1), np.full(30, 0.8)]) + np.random.default_rng(1).normal(0, 0.01, 80)
    t = otsu_threshold(values)
    assert values[:50].max() < t < values[50:].min()


def test_localisation_runs_through_the_runner_and_reuses_its_cache(tmp_path):
    study = STUDIES["localisation"]
    cfg = study.config_from(models=["toy-mmdit"], n=2, bootstrap=10, num_inference_steps=6, patch_n=2, windows=["all", "late"])
    logs = []
    summary = study.run(cfg, out=tmp_path / "l", log=logs.append, quiet=True)
    assert set(summary.readout) == {"word", "word-text", "concept-output", "concept-probability"}
    assert set(summary.word) == {"shape", "color"} and set(summary.layer) == {f"block.0{i}.joint" for i in range(4)}
    assert summary.auroc.between(0, 1).all() and (summary.n == 2).all()
    again = []
    study.run(cfg, out=tmp_path / "l", log=again.append, quiet=True)
    computed = lambda lines: [m for m in map(str, lines) if re.search(r"\(\d+ s\)$", m)]  # noqa: E731
    assert len(computed(logs)) == 2 and computed(again) == []  # the maps unit and the patching unit
    p = __import__("pandas").read_csv(tmp_path / "l" / "patching-summary.csv")
    sites = {"none"} | {f"block.0{i}.image" for i in range(4)} | {f"block.0{i}.text" for i in range(3)}
    assert set(p.site) == sites and set(p.window) == {"none", "all", "late"} and (p.n == 2).all()


def test_rank_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(2)
    soft = np.round(rng.random((16, 16)), 1)  # many ties
    mask = rng.random((16, 16)) < 0.3
    assert abs(auroc(soft, mask) - roc_auc_score(mask.ravel(), soft.ravel())) < 1e-12


def test_group_cis_by_hand():
    import pandas as pd

    from dit_probe.stats import group_cis

    f = pd.DataFrame({"m": ["a", "a", "b", "b", "b"], "x": [1.0, 3.0, 0.0, 0.0, 6.0], "k": [1, 1, 0, 0, 0],
                      "tag": ["p", "q", "r", "s", "t"]})
    out = group_cis(f, ["m"], ["x"], n_boot=200, first=["tag"], means=["k"])
    assert list(out.m) == ["a", "b"] and list(out.n) == [2, 3] and list(out.tag) == ["p", "r"]
    assert list(out.x) == [2.0, 2.0] and list(out.k) == [1.0, 0.0]
    assert (out.x_lo <= out.x).all() and (out.x <= out.x_hi).all() and out.x_lo[1] == 0.0 and out.x_hi[0] <= 3.0
    assert out.equals(group_cis(f, ["m"], ["x"], n_boot=200, first=["tag"], means=["k"]))  # seeded: reproducible
