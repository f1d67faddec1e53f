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
    assert s["best_iou"] == 1.0
    inverted = score_map(-perfect, mask)
    assert inverted["auroc"] == 0.0 and not inverted["pointing"] and inverted["iou"] == 0.0
    assert inverted["best_iou"] == 9 / 64  # the best an inverted map can do: every pixel
    flat_but_one = np.zeros((8, 8))
    flat_but_one[0, 0] = 1.0
    assert not score_map(flat_but_one, mask)["pointing"]


def test_best_iou_equals_a_brute_force_over_thresholds():
    from dit_probe.studies.localisation import best_iou

    rng = np.random.default_rng(3)
    for _ in range(5):
        soft = np.round(rng.random((12, 12)), 1)  # ties
        mask = rng.random((12, 12)) < 0.3
        brute = max(((soft >= t) & mask).sum() / ((soft >= t) | mask).sum() for t in np.unique(soft))
        assert abs(best_iou(soft, mask) - brute) < 1e-12


def test_otsu_splits_two_groups():
    values = np.concatenate([np.full(50, 0.1), np.full(30, 0.8)]) + np.random.default_rng(1).normal(0, 0.01, 80)
    t = otsu_threshold(values)
    assert values[:50].max() < t < values[50:].min()


def test_localisation_runs_through_the_runner_and_reuses_its_cache(tmp_path):
    import pandas as pd

    study = STUDIES["localisation"]
    cfg = study.config_from(models=["toy-mmdit"], n=2, generate_n=2, bootstrap=10, num_inference_steps=6, patch_n=2,
                            windows=["all", "late"],
                            patch_attributes=["color"], layers_n=2, attributes=["shape"], rank_n=2, swap_widths=[1],
                            withhold_k=[1], random_draws=1, heads=["shape"])
    logs = []
    summary = study.run(cfg, out=tmp_path / "l", log=logs.append, quiet=True)
    assert set(summary.readout) == {"word", "word-text", "concept-output", "concept-probability", "default", "paper"}
    assert set(summary.word) == {"shape", "color"} and set(summary.layer) == {f"block.0{i}.joint" for i in range(4)} | {"all"}
    assert set(summary[summary.layer == "all"].readout) == {"default", "paper"}  # no DAAM for a joint-attention model
    assert summary.auroc.between(0, 1).all() and set(summary.level) == {"log_snr=-1.5", "generate"}
    assert (summary[summary.level != "generate"].n == 2).all()  # generated: images where the judge found an object
    again = []
    study.run(cfg, out=tmp_path / "l", log=again.append, quiet=True)
    computed = lambda lines: [m for m in map(str, lines) if re.search(r"\(\d+ s\)$", m)]  # noqa: E731
    assert len(computed(logs)) == 4 and computed(again) == []  # the maps, generated, patching and layers units
    p = pd.read_csv(tmp_path / "l" / "patching-summary.csv")
    sites = ({"none"} | {f"block.0{i}.image" for i in range(4)} | {f"block.0{i}.text" for i in range(3)}
             | {f"block.0{i}.text_in" for i in range(4)})
    assert set(p.site) == sites and set(p.window) == {"none", "all", "late"} and (p.n == 2).all()
    assert set(p.attribute) == {"color"}
    s = pd.read_csv(tmp_path / "l" / "layers-summary.csv")
    layers = [f"block.0{i}.joint" for i in range(4)]
    variants = lambda kind: list(s[s.kind == kind].variant)  # noqa: E731
    assert set(s.attribute) == {"shape"} and variants("plain") == ["none"] and variants("contribution") == layers
    assert variants("swap") == [*layers, "+".join(layers)]  # width 1, and all layers
    assert variants("withhold") == [*layers, "all", "top-1", "bottom-1", "random-1"]
    assert variants("knockout") == [f"{n}/{h}" for n in layers for h in range(4)]
    rows = pd.read_csv(tmp_path / "l" / "layers.csv")
    assert (rows[rows.kind == "contribution"].value > 0).all()
    a = pd.read_csv(tmp_path / "l" / "agreement.csv")
    assert set(a.readout) == {"contribution", "map AUROC"} and set(a.causal) == {"text swap (flipped)", "withhold (lost)"}
    # a part's own setting recomputes that part only
    redo = []
    study.run(cfg.model_copy(update={"windows": ["all"]}), out=tmp_path / "l", log=redo.append, quiet=True)
    assert [m.split(" ")[1].rstrip(":") for m in computed(redo)] == ["patching--color"]
    redo = []
    study.run(cfg.model_copy(update={"readouts": ["word", "paper"]}), out=tmp_path / "l", log=redo.append, quiet=True)
    assert sorted(m.split(" ")[1].rstrip(":") for m in computed(redo)) == ["generated", "maps--log_snr=-1.5"]


def test_agreement_and_smallest_window_by_hand():
    import pandas as pd

    from dit_probe.studies.localisation_causal import agreement, smallest_flipping_window

    rows = []
    for layer, value in (("A", 1.0), ("B", 3.0), ("C", 2.0)):
        rows += [dict(kind="contribution", variant=layer, layers=layer, k=1, scene=i, value=value) for i in range(2)]
    for layer, flips, losses in (("A", [0, 0], [0, 0]), ("B", [1, 1], [1, 0]), ("C", [1, 0], [0, 0])):
        rows += [dict(kind="swap", variant=layer, layers=layer, k=1, scene=i, flipped=f) for i, f in enumerate(flips)]
        rows += [dict(kind="withhold", variant=layer, layers=layer, k=1, scene=i, lost=x) for i, x in enumerate(losses)]
    frame = pd.DataFrame(rows).assign(model="m", attribute="color")
    a = agreement(frame, None, n_boot=50).set_index("causal")
    assert a.loc["text swap (flipped)", "spearman"] == 1.0  # contributions 1 < 2 < 3 and flips 0 < 0.5 < 1
    assert abs(a.loc["withhold (lost)", "spearman"] - 1.5 / 3 ** 0.5) < 1e-12  # ranks (1, 3, 2) vs (1.5, 3, 1.5)
    summary = pd.DataFrame([dict(model="m", attribute="color", kind="swap", variant=v, k=k, flipped=f)
                            for v, k, f in (("A", 1, 0.2), ("B", 1, 0.4), ("A+B", 2, 0.6), ("B+C", 2, 0.9))])
    small = smallest_flipping_window(summary).iloc[0]
    assert small.window == "B+C" and small.width == 2 and small.flipped == 0.9
    assert smallest_flipping_window(summary.assign(flipped=0.1)).iloc[0].window == "none"


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
