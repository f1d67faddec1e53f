"""The semantic-loss sweep, the alpha-threshold study and the SDE table: unit maths on constructed
inputs, reduced toy runs with measured bars, resumption, and clear errors on bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dit_probe.cli import main
from dit_probe.studies import alpha_threshold as at
from dit_probe.studies import sde as sde_study
from dit_probe.studies import semantic_loss as sl
from dit_probe.studies import toy_editing as te
from dit_probe.studies.sources import CelebAError, CelebASource, ToySource, read_celeba_attributes
from dit_probe.toyworld import ATTRIBUTES, Scene, render


# ----- threshold detection -----
def test_crossing_interpolates_between_grid_points():
    alphas = [-2, -1, 0, 1, 2, 3]
    collateral = [0.5, 0.05, 0.0, 0.05, 0.25, 0.6]
    assert at.crossing(alphas, collateral, 0.1, +1) == pytest.approx(1 + (0.1 - 0.05) / 0.2)  # 1.25
    assert at.crossing(alphas, collateral, 0.1, -1) == pytest.approx(-1 - (0.1 - 0.05) / 0.45)
    assert np.isnan(at.crossing(alphas, collateral, 0.7, +1))  # never exceeds
    assert at.crossing(alphas, [0.2] * 6, 0.1, +1) == 0.0  # already above at alpha 0
    assert at.crossing(alphas, [0, 0, 0, 0.5, 0.5, 1], 0.5, +1, inclusive=True) == 1.0  # reaches vs exceeds
    assert at.crossing(alphas, [0, 0, 0, 0.5, 0.5, 1], 0.5, +1) == pytest.approx(2.0)  # exceeds just after 2
    assert at.crossing([3, 0, 1, 2], [0.6, 0.0, 0.05, 0.25], 0.1, +1) == pytest.approx(1.25)  # order-free


# ----- retention on synthetic judge outputs -----
class FixedEditor:
    """Stands in for EIMEditor: every prompt but the empty one reconstructs the source exactly; the empty
    prompt gives one fixed scene (a small red circle on black)."""

    strength = 0.5
    FIXED = Scene("circle", "red", "small", "black")

    class adapter:
        @staticmethod
        def log_snr(t):
            return -1.5

    def encode(self, images, prompts, seeds):
        from types import SimpleNamespace

        return SimpleNamespace(images=images, t=500.0)

    def reconstruct(self, enc, prompts=None):
        return np.stack([im if p else render(self.FIXED) for im, p in zip(enc.images, prompts)])


def test_retention_counts_what_the_judge_reads():
    source = ToySource()
    cfg = sl.SemanticLossConfig(n=24, seeds=2)
    items = source.sample(cfg.n, seed=5)
    rows, examples = sl.run_unit(FixedEditor(), source, items, cfg)
    rows = rows.assign(model="fixed", level="strength=0.5", paper_start=False)
    summary = sl.summarise(rows, source.values)
    get = summary.set_index(["prompt", "attribute"]).retention
    for a in ATTRIBUTES:
        assert get["full", a] == 1.0 and get["omit", a] == 1.0  # renders are read exactly
        expected = np.mean([lab[a] == getattr(FixedEditor.FIXED, a) for lab in items.labels])
        assert get["empty", a] == pytest.approx(expected)
    assert set(summary.chance.round(3)) == {0.125, 0.5, 0.333}
    assert (summary.images == 24).all() and (summary.samples == 48).all()
    assert examples["source"].shape == (1, 32, 32, 3) and "no-color" in examples


def test_retention_ci_is_over_images_with_their_seeds_averaged():
    rows = pd.DataFrame({"model": "m", "prompt": "omit", "attribute": "color", "level": "strength=0.5",
                         "strength": 0.5, "timestep": 1.0, "log_snr": 0.0, "paper_start": False, "image": np.repeat(np.arange(10), 2),
                         "retained": [True, False] * 5 + [True, True] * 5})
    s = sl.summarise(rows, {"color": ATTRIBUTES["color"]}, n_boot=500).iloc[0]
    assert s.retention == pytest.approx(0.75) and s.images == 10 and s.samples == 20
    assert s.retention_lo < 0.75 < s.retention_hi and s.retention_lo >= 0.5


# ----- sources -----
def _celeba(tmp_path, n=6, columns=("Young", "Male", "Smiling", "Blond_Hair", "Eyeglasses", "Wearing_Hat")):
    from PIL import Image

    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [str(n), " ".join(columns)]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3)).astype(np.uint8)).save(root / "img_align_celeba" / name)
        lines.append(name + " " + " ".join(rng.choice(["1", "-1"], len(columns))))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celeba_folder_is_read_and_sampled(tmp_path):
    root = _celeba(tmp_path)
    names, columns, table = read_celeba_attributes(root)
    assert len(names) == 6 and table.shape == (6, 6) and set(np.unique(table)) <= {-1, 1}
    src = CelebASource(root, ["age", "eyeglasses"])
    items = src.sample(4, seed=0, size=64)
    assert items.images.shape == (4, 64, 64, 3) and items.images.dtype == np.uint8
    for lab in items.labels:
        assert lab["age"] in ("young", "old") and set(lab) == {"age", "eyeglasses"}
    assert src.caption({"age": "old", "eyeglasses": "wearing eyeglasses"}) == "a photo of a person, old, wearing eyeglasses"
    assert src.caption({"age": "old", "eyeglasses": "wearing eyeglasses"}, drop=("age",)) == \
        "a photo of a person, wearing eyeglasses"
    assert src.flip("age", "old") == "young"
    # the labels follow the file: image k's 'Young' column
    first = read_celeba_attributes(root)[2][:, 0]
    idx = np.random.default_rng(0).choice(6, 4, replace=False)
    assert [lab["age"] for lab in items.labels] == ["young" if first[r] > 0 else "old" for r in idx]


def test_celeba_missing_or_malformed_names_the_expected_files(tmp_path):
    with pytest.raises(CelebAError, match="list_attr_celeba.txt and img_align_celeba/"):
        CelebASource(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CelebAError, match="has no list_attr_celeba.txt.*img_align_celeba/"):
        CelebASource(tmp_path / "empty")
    root = _celeba(tmp_path)
    text = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(text[:3] + ["000002.jpg 1 0 1"] + text[4:]) + "\n")
    with pytest.raises(CelebAError, match="line 4 is malformed"):
        CelebASource(root)
    root2 = _celeba(tmp_path / "b", columns=("Young", "Male"))
    with pytest.raises(CelebAError, match="lacks the column"):
        CelebASource(root2, ["hat"])
    (root2 / "img_align_celeba" / "000001.jpg").unlink()
    with pytest.raises(CelebAError, match="000001.jpg .* is not in"):
        CelebASource(root2, ["age"]).sample(6, seed=0, size=32)
    with pytest.raises(KeyError, match="unknown CelebA attribute 'smile'"):
        CelebASource(root2, ["smile"])


# ----- bad input -----
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys):
    for bad in (0.0, 1.2, -0.1):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            sl.SemanticLossConfig(strengths=[0.15, bad]).check()
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            sde_study.SDEConfig(strengths=[bad]).check()
    with pytest.raises(ValueError, match="at least one noise level"):
        sde_study.SDEConfig(strengths=[], log_snrs=[]).check()
    with pytest.raises(ValueError, match="must be finite"):
        te.ToyEditConfig(log_snrs=[float("nan")]).check()
    with pytest.raises(KeyError, match="toy judge knows the attributes .* not 'smile'"):
        sl.run(sl.SemanticLossConfig(attributes=["color", "smile"]), out=tmp_path / "sl0")
    assert not (tmp_path / "sl0").exists()
    with pytest.raises(KeyError, match="not 'hat'"):
        sde_study.run(sde_study.SDEConfig(attributes=["hat"]), out=tmp_path / "sde")
    assert not (tmp_path / "sde").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="include 0 .* negative and positive"):
        at.AlphaThresholdConfig(alphas=[0, 1, 2]).check()
    with pytest.raises(CelebAError, match="needs the CelebA folder"):
        sl.run(sl.SemanticLossConfig(source="celeba"), out=tmp_path / "sl")
    assert main(["run", "semantic-loss", "--strength", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert main(["run", "sde", "--attribute", "smile", "--out", str(tmp_path / "x")]) == 2
    assert "not 'smile'" in capsys.readouterr().err
    assert main(["run", "sde", "--source", "celeba", "--celeba", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "list_attr_celeba.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # an option of another study is refused, never ignored
        main(["run", "sde", "--folds", "3"])
    assert err.value.code == 2 and "unrecognized arguments: --folds 3" in capsys.readouterr().err


# ----- reduced toy runs -----
def test_semantic_loss_toy_run_loses_unnamed_attributes_and_resumes(tmp_path):
    cfg = sl.SemanticLossConfig(models=["toy-mmdit"], strengths=[0.15, 0.95], n=12, seeds=1)
    out = tmp_path / "sl"
    summary = sl.run(cfg, out=out, figures=tmp_path / "fig", log=lambda *a: None)
    get = summary.set_index(["prompt", "attribute", "strength"]).retention
    for a in ATTRIBUTES:  # a little noise: everything survives whatever the prompt
        assert get["full", a, 0.15] >= 0.9 and get["omit", a, 0.15] >= 0.9
    # nearly pure noise: the full prompt restores colour, the prompts without it do not
    assert get["full", "color", 0.95] >= 0.8
    assert get["omit", "color", 0.95] <= 0.5 and get["empty", "color", 0.95] <= 0.5
    assert get["omit", "color", 0.95] < get["omit", "color", 0.15]
    log_snr = summary.groupby("strength").log_snr.first()
    assert log_snr[0.15] > log_snr[0.95]  # more strength, less signal
    for name in ("semantic-loss-curves.png", "semantic-loss-grid.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 5000
    assert "| toy-mmdit | color |" in (tmp_path / "fig" / "semantic-loss-table.md").read_text()
    assert {"config.json", "run.json", "retention.csv", "summary.csv"} <= {p.name for p in out.iterdir()}
    # resume: a missing unit is recomputed identically, the other is read back untouched
    [unit] = (out / "units" / "toy-mmdit").glob("strength=0.95-*.csv")
    [kept] = (out / "units" / "toy-mmdit").glob("strength=0.15-*.csv")
    before, stamp = pd.read_csv(unit), kept.stat().st_mtime_ns
    unit.unlink()
    again = sl.run(cfg, out=out, figures=tmp_path / "fig", log=lambda *a: None)
    pd.testing.assert_frame_equal(pd.read_csv(unit), before)
    assert kept.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, summary)


def test_alpha_threshold_toy_run(tmp_path):
    cfg = at.AlphaThresholdConfig(models=["toy-mmdit"], attributes=["color"], modes=["eim"], n=6,
                                  alphas=[-1.0, 0.0, 1.0, 3.0])
    th = at.run(cfg, out=tmp_path / "at", figures=tmp_path / "fig", log=lambda *a: None)
    rows = pd.read_csv(tmp_path / "at" / "alphas.csv")
    summary = pd.read_csv(tmp_path / "at" / "summary.csv").set_index("alpha")
    assert (rows[rows.alpha == 0].collateral == 0).all()  # alpha 0 is the reference by construction
    assert summary.loc[1.0, "target_score"] >= summary.loc[0.0, "target_score"] + 0.5  # the edit works
    assert summary.loc[1.0, "success"] >= 0.8
    r = th.iloc[0]
    assert 0 < r.success_alpha <= 1.0
    assert (rows.projection_side == "image").all() and rows.alpha_match.notna().all()
    assert r.log_snr == pytest.approx(-4.40, abs=0.01) and r.paper_start  # the default level: strength 0.75
    for name in ("alpha-threshold-curves.png", "alpha-threshold-examples.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 5000
    assert "| color | eim | -4.40 * | toy-mmdit |" in (tmp_path / "fig" / "alpha-threshold-table.md").read_text()


def test_projection_is_standardised_against_the_other_latents():
    """Three latents on a line: edit 0's direction is (1, 0); the others project to 1 and 3 (mean 2, sd
    sqrt 2), edit 0's own latent to 0, so at alpha a it sits at z = (0 + a - 2) / sqrt(2)."""
    from types import SimpleNamespace

    zt = torch.tensor([[0.0, 0.0], [1.0, 5.0], [3.0, -2.0]])
    n = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    direction = SimpleNamespace(image=n, image_at=lambda a: n)
    p = at.projections(SimpleNamespace(zt=zt), direction, [0.0, 1.0, 2.0], SimpleNamespace(zt=zt + n * 0.5))
    np.testing.assert_allclose(p["z"][0], [(0 - 2) / np.sqrt(2), (1 - 2) / np.sqrt(2), 0.0])
    np.testing.assert_allclose(p["alpha_match"], [0.5, 0.5, 0.5])  # the target sits half a direction away
    assert p["side"] == "image"


def test_sde_toy_run_checks_its_precondition_per_noise_level(tmp_path):
    cfg = sde_study.SDEConfig(models=["toy-mmdit"], attributes=["color"], n=12, seeds=1, strengths=[0.15, 0.95])
    summary = sde_study.run(cfg, out=tmp_path / "sde", figures=tmp_path / "fig", log=lambda *a: None)
    rows = pd.read_csv(tmp_path / "sde" / "sde.csv")
    low, high = (summary.set_index("level").loc[f"strength={s}"] for s in (0.15, 0.95))
    # a little noise: the caption without the colour keeps it, so Eq. 2's precondition fails there
    assert low.omit_kept >= 0.9 and not low.precondition
    # nearly pure noise: the colour is lost without its word, and the flip takes
    assert high.omit_kept_hi <= high.lost_below and high.precondition
    assert high.flip_success >= 0.8 and high.kept_success >= 0.8 and high.ratio < 0.8
    assert high.log_snr < low.log_snr
    assert set(rows.value) <= {"red", "blue"} and (rows.value != rows.flipped_value).all()
    assert (rows.floor <= rows.sde + 1e-12).all()  # no flip scores under the floor
    md = (tmp_path / "fig" / "sde-table3.md").read_text()
    assert "Norm: rms" in md and "| FAILS |" in md and "| holds |" in md
    assert (tmp_path / "fig" / "sde-table3.png").stat().st_size > 5000


def _sde_rows(model, level, ratio, omit_kept, n=20):
    rng = np.random.default_rng(len(model))
    return pd.DataFrame({"model": model, "attribute": "color", "level": level, "target_log_snr": -3.0,
                         "strength": 0.7, "log_snr": -3.0, "paper_start": False, "image": np.arange(n), "chance": 0.125,
                         "ratio": ratio + rng.normal(0, 0.02, n), "kept": 0.1, "flipped": 0.3, "sde": 0.6,
                         "floor": 0.63, "floor_share": 0.9, "flip_success": True, "kept_success": True,
                         "omit_kept": np.arange(n) < omit_kept * n})


def test_sde_verdicts_need_the_precondition_and_a_ci_that_excludes_zero():
    lost = pd.concat([_sde_rows("a", "log_snr=-3", 0.3, 0.1), _sde_rows("b", "log_snr=-3", 0.5, 0.1)])
    s = sde_study.summarise(lost, n_boot=300)
    assert s.precondition.all() and s.lost_below.iloc[0] == pytest.approx(0.125 + 0.5 * 0.875)
    v = sde_study.verdicts(lost, s, n_boot=300, models=["a", "b"]).iloc[0]
    assert v.verdict == "a lower ratio" and v.ratio_diff == pytest.approx(0.2, abs=0.02) and v.ratio_diff_lo > 0
    kept = pd.concat([_sde_rows("a", "log_snr=-3", 0.3, 0.9), _sde_rows("b", "log_snr=-3", 0.5, 0.1)])
    s = sde_study.summarise(kept, n_boot=300)
    assert list(s.precondition) == [False, True]
    assert sde_study.verdicts(kept, s, n_boot=300).iloc[0].verdict == "no verdict: precondition fails"
    same = pd.concat([_sde_rows("a", "log_snr=-3", 0.4, 0.1), _sde_rows("b", "log_snr=-3", 0.4, 0.1)])
    s = sde_study.summarise(same, n_boot=300)
    assert sde_study.verdicts(same, s, n_boot=300).iloc[0].verdict == "no difference (CI spans 0)"
    nominal = pd.concat([_sde_rows("a", "strength=0.75", 0.3, 0.1), _sde_rows("b", "strength=0.75", 0.5, 0.1)])
    assert sde_study.verdicts(nominal, sde_study.summarise(nominal, n_boot=50)).empty  # no verdict off matched noise


# ----- the real-image path: CelebA folder + CLIP judge, on tiny random pipelines -----
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux", "tiny-unet"])
def test_studies_run_on_a_celeba_folder_with_the_clip_judge(tmp_path, model):
    from dit_probe.tiny import tiny_clip

    root = _celeba(tmp_path, n=5)
    clip_dir = tmp_path / "clip"
    for part in tiny_clip():
        part.save_pretrained(clip_dir)
    common = dict(models=[model], source="celeba", celeba=str(root), clip=str(clip_dir), num_inference_steps=4)
    s = sl.run(sl.SemanticLossConfig(attributes=["age", "hat"], strengths=[0.5, 1.0], n=3, seeds=1, **common),
               out=tmp_path / "sl", figures=tmp_path / "fig", log=lambda *a: None)
    rows = pd.read_csv(tmp_path / "sl" / "retention.csv")
    # per strength: full (2 attributes) + omit (1 each) + empty (2) readings per image
    assert len(rows) == 2 * 3 * (2 + 2 + 2)
    assert set((s.retention * 3).round(9)) <= {0.0, 1.0, 2.0, 3.0}  # a share of 3 images, one noise each
    assert set(rows["value"]) <= {"young", "old", "wearing a hat", "without a hat"}
    th = at.run(at.AlphaThresholdConfig(attributes=["eyeglasses"], modes=["eim"], n=3, alphas=[-1.0, 0.0, 1.0],
                                        **common), out=tmp_path / "at", figures=tmp_path / "fig", log=lambda *a: None)
    arows = pd.read_csv(tmp_path / "at" / "alphas.csv")
    assert len(arows) == 9 and (arows[arows.alpha == 0].collateral == 0).all() and not arows.masked.any()
    assert len(th) == 1 and arows.alpha_match.isna().all()  # no target images for real edits
    d = sde_study.run(sde_study.SDEConfig(attributes=["gender"], n=3, seeds=1, strengths=[0.6], **common),
                      out=tmp_path / "sde", figures=tmp_path / "fig", log=lambda *a: None)
    drows = pd.read_csv(tmp_path / "sde" / "sde.csv")
    assert set(drows.value) <= {"male", "female"} and np.isfinite(d.sde).all()
    assert (d.chance == 0.5).all() and d.precondition.dtype == bool  # two phrases: chance is a half


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_loads_and_validates(path):
    """A typo or a setting a study does not know fails here, not on a GPU hours later."""
    from dit_probe.studies import STUDIES

    name = next(k for k in sorted(STUDIES, key=len, reverse=True) if path.name.startswith(k))
    cfg = STUDIES[name].config_from(path)  # validates types and the study's own rules
    assert cfg.model_dump()  # and round-trips


def test_ablation_studies_on_the_toy_model(tmp_path):
    from dit_probe.studies import ablations as ab

    cfg = ab.HSDSAblationConfig(models=["toy-mmdit"], attributes=["size"], n=3, lams=[0.1, 1.0], eta_starts=[0.05, 0.2])
    s = ab.run_hsds(cfg, out=tmp_path / "h", figures=tmp_path / "fig", log=lambda *a: None)
    top = s[s.alpha == 1.5].set_index(["lam", "eta_start"])
    for lam in (0.1, 1.0):  # a larger step moves the latent further, at every lambda
        assert top.loc[(lam, 0.2), "direction_norm"] > top.loc[(lam, 0.05), "direction_norm"]
    base = s[s.alpha == 0.0]
    assert base.target_score.nunique() == 1  # alpha 0 is the same reconstruction whatever the settings
    g = ab.run_sds(ab.SDSGuidanceConfig(models=["toy-mmdit"], attributes=["size"], n=3), out=tmp_path / "s",
                   figures=tmp_path / "fig", log=lambda *a: None)
    rows = pd.read_csv(tmp_path / "s" / "rows.csv")
    assert set(rows.guide) == {"target", "source"} and len(rows) == 2 * 3 * 3
    norms = rows.groupby("guide").direction_norm.mean()
    assert norms["target"] != pytest.approx(norms["source"])  # the two guides give different directions
    assert g[g.alpha == 0].target_score.nunique() == 1
    for name in ("hsds-ablation.png", "sds-guidance.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 5000
