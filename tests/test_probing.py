"""The probing study: probes measure what they claim, the dataset is exact and resumable, bad input is refused."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, recall_score
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dit_probe import record
from dit_probe.probing import (
    ProbeDataError,
    ProbeDataset,
    ProbeGrid,
    ProbeSettings,
    ProbingInputError,
    build,
    direct_probe,
    probe,
    text_features,
)
from dit_probe.probing.probes import _metrics_from, _sufficient_stats, out_of_fold, summarise
from dit_probe.studies import probing

from .conftest import FAMILIES

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


# ----- the probes, on data with a planted answer -----
def _planted(n_seeds=8, k=4, m=3, own=2.0, other=0.0, features=16, seed=0):
    """k labels x m objects x n_seeds images; the label is added to one feature of X_own (and X_other)."""
    rng = np.random.default_rng(seed)
    labels, groups = np.meshgrid(np.arange(k), np.arange(n_seeds), indexing="ij")
    labels, groups = np.repeat(labels.ravel(), m), np.repeat(groups.ravel(), m)
    X_own, X_other = rng.normal(size=(2, len(labels), features))
    X_own[np.arange(len(labels)), labels] += own
    X_other[np.arange(len(labels)), labels] += other
    return X_own, X_other, labels, groups


def _by_metric(rows):
    return {r["metric"]: r for r in rows if r["class"] == "all"}


def test_probe_finds_a_planted_label_and_no_leakage_where_there_is_none():
    r = _by_metric(probe(*_planted(own=4.0, other=0.0), settings=ProbeSettings(bootstrap=300)))
    assert r["accuracy"]["value"] >= 0.9 and r["accuracy"]["chance"] == 0.25
    assert r["accuracy"]["ci_low"] <= r["accuracy"]["value"] <= r["accuracy"]["ci_high"]
    # no label in X_other: leakage and every control sit at chance (within sampling noise of 96 images)
    assert abs(r["leakage"]["value"] - 0.25) < 0.1
    assert r["ovr_leakage_balanced"]["ci_low"] < 0.5 + 0.03 and r["ovr_leakage_balanced"]["ci_high"] > 0.5 - 0.03
    assert abs(r["accuracy"]["shuffled"] - 0.25) < 0.1
    assert abs(r["ovr_balanced"]["shuffled"] - 0.5) < 0.08


def test_probe_detects_leakage_when_the_other_maps_carry_the_label():
    r = _by_metric(probe(*_planted(own=4.0, other=4.0), settings=ProbeSettings(bootstrap=100)))
    assert r["leakage"]["value"] >= 0.85 and r["ovr_leakage_balanced"]["value"] >= 0.85
    assert r["leakage"]["ci_low"] > r["leakage"]["shuffled_ci_high"]


def test_cross_validation_holds_out_whole_seeds():
    X, Xo, y, g = _planted()
    oof = out_of_fold(X, Xo, y, g, ProbeSettings(folds=4))
    for s in np.unique(g):
        assert len(np.unique(oof["fold"][g == s])) == 1  # a seed is never split between train and test
    assert len(np.unique(oof["fold"])) == 4


def test_metrics_and_bootstrap_match_a_direct_computation():
    X, Xo, y, g = _planted(own=1.0, other=0.5)
    settings = ProbeSettings(folds=4)
    oof = out_of_fold(X, Xo, y, g, settings)
    rows = summarise(oof, g, settings)
    r = _by_metric(rows)
    assert r["accuracy"]["value"] == pytest.approx(accuracy_score(oof["y"], oof["multi_own"]))
    assert r["leakage"]["value"] == pytest.approx(accuracy_score(oof["y"], oof["multi_other"]))
    k = len(oof["classes"])
    tpr = [oof["ovr_other"][oof["y"] == c, c].mean() for c in range(k)]
    tnr = [1 - oof["ovr_other"][oof["y"] != c, c].mean() for c in range(k)]
    assert r["ovr_leakage_ratio"]["value"] == pytest.approx(np.mean(tpr))
    assert r["ovr_leakage_balanced"]["value"] == pytest.approx(np.mean((np.array(tpr) + tnr) / 2))
    per_class = {row["class"]: row["value"] for row in rows if row["metric"] == "ovr_ratio" and row["class"] != "all"}
    want = recall_score(oof["y"] == 2, oof["ovr_own"][:, 2])
    assert per_class[str(oof["classes"][2])] == pytest.approx(want)
    # the bootstrap reweights per-seed sums; the slow way concatenates the drawn seeds' images
    stats = _sufficient_stats(oof["y"], oof["multi_own"], oof["ovr_own"], k)
    per_group = np.stack([stats[g == s].sum(0) for s in range(g.max() + 1)])
    rng = np.random.default_rng(5)
    for _ in range(5):
        drawn = rng.integers(0, g.max() + 1, g.max() + 1)
        weights = np.bincount(drawn, minlength=g.max() + 1).astype(float)
        idx = np.concatenate([np.flatnonzero(g == s) for s in drawn])
        fast = _metrics_from(weights @ per_group, k)
        assert fast["accuracy"] == pytest.approx(accuracy_score(oof["y"][idx], oof["multi_own"][idx]))
        slow_tpr = [oof["ovr_own"][idx][oof["y"][idx] == c, c].mean() for c in range(k)]
        assert fast["ratio"] == pytest.approx(np.mean(slow_tpr))


def test_probe_refuses_data_it_cannot_cross_validate():
    X, Xo, y, g = _planted(n_seeds=3)
    with pytest.raises(ProbeDataError, match="too few samples for 5-fold cross-validation.*3 seed"):
        probe(X, Xo, y, g)
    with pytest.raises(ProbeDataError, match="at least 2 classes"):
        probe(X, Xo, np.zeros_like(y), g, ProbeSettings(folds=2))
    y2 = y.copy()
    y2[(y == 1) & (g == 0)] = 0  # class 1 never occurs with seed 0
    with pytest.raises(ProbeDataError, match="fewer than 3 seeds"):
        probe(X, Xo, y2, g, ProbeSettings(folds=3))
    with pytest.raises(ProbeDataError, match="same images"):
        probe(X, Xo[:-1], y, g, ProbeSettings(folds=3))


def test_transfer_scalers_separate_a_shifted_distribution_from_missing_information():
    """The object maps carry the colour exactly as the colour maps do, but offset and shrunk: the probe's
    own scaler ("source") and no scaler see only the offset; the object maps' own scaler finds the colour."""
    X_own, X_other, y, g = _planted(own=4.0, other=4.0)
    r = _by_metric(probe(X_own, 100 + 0.05 * X_other, y, g, ProbeSettings(bootstrap=50)))
    assert r["accuracy"]["value"] >= 0.9 and r["accuracy_no_scaler"]["value"] >= 0.9
    assert r["leakage_own_scaler"]["value"] >= 0.85
    assert r["leakage"]["value"] < 0.35 and r["leakage_no_scaler"]["value"] < 0.35  # chance 0.25


def test_own_scaler_uses_only_the_training_fold():
    """Seed 0's object maps are shifted: a scaler fitted on the training fold keeps the shift (and the
    probe fails on seed 0), one fitted on the test maps themselves would remove it."""
    X_own, _, y, g = _planted(own=4.0)
    X_other = X_own.copy()
    X_other[g == 0] += 50.0
    oof = out_of_fold(X_own, X_other, y, g, ProbeSettings(folds=8))  # one seed per test fold
    assert accuracy_score(oof["y"][g == 0], oof["multi_other_own_scaler"][g == 0]) < 0.5
    assert accuracy_score(oof["y"][g != 0], oof["multi_own"][g != 0]) >= 0.9


def test_direct_probe_reads_the_other_maps_and_only_them():
    X_own, X_other, y, g = _planted(own=0.0, other=4.0)
    r = _by_metric(direct_probe(X_other, y, g, ProbeSettings(bootstrap=100)))
    assert set(r) == {"direct", "ovr_direct_ratio", "ovr_direct_balanced"}
    assert r["direct"]["value"] >= 0.85 and r["direct"]["ci_low"] > r["direct"]["shuffled_ci_high"]
    assert r["direct"]["chance"] == 0.25
    # chance checks on 384 images (the accuracy of an uninformed probe: 0.25 +- 0.02)
    X_own, X_other, y, g = _planted(n_seeds=16, m=6, own=4.0, other=4.0)
    # the labels shuffled once, before the probe: no information left, the direct probe sits at chance
    shuffled = np.random.default_rng(3).permutation(y)
    assert abs(_by_metric(direct_probe(X_other, shuffled, g, ProbeSettings(bootstrap=50)))["direct"]["value"] - 0.25) < 0.08
    # the colour only in the colour maps: nothing for a probe trained and tested on the object maps
    X_own, X_other, y, g = _planted(n_seeds=16, m=6, own=4.0, other=0.0)
    assert abs(_by_metric(direct_probe(X_other, y, g, ProbeSettings(bootstrap=50)))["direct"]["value"] - 0.25) < 0.08


def test_rows_repeated_over_seeds_leak_unless_whole_objects_are_held_out():
    """Text-encoder rows are the same for every seed. Rows with no colour code shared by objects (a random
    vector per prompt): grouped by seed, a copy of every test row is in training (memorised, near 1);
    grouped by object, chance."""
    rng = np.random.default_rng(0)
    k, m, n_seeds, d = 4, 12, 5, 64
    per_prompt = rng.normal(size=(k, m, d))
    colors, objects, seeds = (a.ravel() for a in np.meshgrid(np.arange(k), np.arange(m), np.arange(n_seeds), indexing="ij"))
    X = per_prompt[colors, objects] + 0.01 * rng.normal(size=(len(colors), d))
    by_seed = _by_metric(direct_probe(X, colors, seeds, ProbeSettings(bootstrap=50)))["direct"]["value"]
    by_object = _by_metric(direct_probe(X, colors, objects, ProbeSettings(bootstrap=50), group_name="object"))
    assert by_seed >= 0.95 and by_object["direct"]["value"] < 0.4
    # a colour code shared by all objects is found on objects the probe never saw
    shared = per_prompt + 1.5 * np.repeat(np.eye(k), d // k, axis=1)[:, None, :]  # colour c: +1.5 on its 16 features
    text = {"colors": np.repeat(np.arange(k), m), "objects": np.tile(np.arange(m), k),
            "object": {"clip": shared.reshape(k * m, d)}, "color": {"clip": per_prompt.reshape(k * m, d)}}
    r = {(row["metric"], row["features"]): row for row in probing.text_controls(text, ProbeSettings(bootstrap=50))
         if row["class"] == "all"}
    assert r["text_object", "text-encoder/clip"]["value"] >= 0.9 and r["text_object", "text-encoder/clip"]["cv_groups"] == "object"
    assert r["text_color", "text-encoder/clip"]["value"] < 0.4  # the 'colour' rows here are the random ones
    with pytest.raises(ProbeDataError, match="grouped by object: the data has 3 object"):
        direct_probe(X[objects < 3], colors[objects < 3], objects[objects < 3], group_name="object")


# ----- the text-encoder control -----
def test_text_features_are_the_encoded_prompt_at_the_words(pipes):
    pipe = pipes("tiny-unet")
    text = text_features(pipe, ProbeGrid(colors=["red", "purple"], objects=["car", "bus"], seeds=[0]))
    assert list(text["colors"]) == ["red", "purple", "red", "purple"] and list(text["objects"]) == ["car"] * 2 + ["bus"] * 2
    assert set(text["object"]) == set(text["color"]) == {"clip"}
    with torch.no_grad():
        emb = pipe.encode_prompt(["a purple bus"], "cpu", 1, False)[0][0].numpy()
    pieces = pipe.tokenizer.tokenize("a purple bus")  # 'a', the pieces of 'purple', 'bus'; position 0 is BOS
    assert len(pieces) > 3
    np.testing.assert_allclose(text["object"]["clip"][3], emb[len(pieces)], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text["color"]["clip"][3], emb[2:len(pieces)].mean(0), rtol=1e-5, atol=1e-6)


def test_text_control_finds_the_colour_only_where_a_causal_encoder_can_put_it(pipes):
    """CLIP is causal: the object word carries the colour word before it, never one after it (then every
    colour gives the object word the same row and any probe is right once per object: exactly chance)."""
    grid = dict(colors=["red", "blue", "green", "yellow"], objects=["car", "bus", "cat", "dog", "tree"], seeds=[0])
    settings = ProbeSettings(bootstrap=50)

    def control(name, template):
        text = text_features(pipes(name), ProbeGrid(**grid, template=template))
        return {(r["metric"], r["features"]): r["value"] for r in probing.text_controls(text, settings)
                if r["class"] == "all"}

    after = control("tiny-unet", "a {color} {object}")
    assert after["text_object", "text-encoder/clip"] >= 0.8 and after["text_color", "text-encoder/clip"] == 1.0
    before = control("tiny-sd3", "a {object} {color}")
    assert before["text_object", "text-encoder/clip"] == pytest.approx(0.25)
    assert before["text_color", "text-encoder/clip"] == 1.0 and ("text_object", "text-encoder/t5") in before


# ----- the dataset -----
GRID = dict(colors=["red", "blue"], objects=["car"], seeds=[0, 1], sampling={"num_inference_steps": 2})


@pytest.mark.parametrize("name", FAMILIES)
def test_dataset_maps_equal_recording_each_prompt_alone(pipes, name, tmp_path):
    """Every stored map is what recording the one prompt with its own seed gives (batching changes nothing)."""
    from dit_probe.registry import sampling_settings

    pipe = pipes(name)
    pipe.dit_probe_settings = {"height": 32, "width": 32, "guidance_scale": 4.0,
                               **({"max_sequence_length": 16} if hasattr(pipe, "transformer") else {}),
                               **({"use_resolution_binning": False, "clean_caption": False} if "pixart" in name else {})}
    data = build(pipe, name, ProbeGrid(**GRID), tmp_path / "d", log=lambda m: None)
    assert data.maps.shape[:4] == (4, 2, 2, len(data.layers))  # (image, token, step, layer, y, x)
    grid = tuple(data.meta["grid"])
    for i in np.flatnonzero(data.seeds == 1):
        color = data.colors[i]
        with record(pipe, words=[color, "car"]) as maps:
            image = pipe([f"a {color} car"], generator=[torch.Generator().manual_seed(1)], output_type="np",
                         num_inference_steps=2, **sampling_settings(pipe)).images
        for t, word in enumerate((color, "car")):
            want = maps.tensor(word, branch="cond", grid=grid)[:, :, 0, 0, 0, 0]  # (step, layer, y, x)
            torch.testing.assert_close(torch.from_numpy(data.maps[i, t]), want, rtol=1e-4, atol=1e-6)
        assert np.abs(data.images[i].astype(int) - np.round(image[0] * 255).astype(int)).max() <= 1


def test_interrupted_build_resumes_without_recomputing(pipes, tmp_path):
    pipe = pipes("tiny-unet")
    grid = ProbeGrid(colors=["red", "blue"], objects=["car", "bus"], seeds=[0, 1, 2], sampling={"num_inference_steps": 2})
    whole = build(pipe, "tiny-unet", grid, tmp_path / "whole", log=lambda m: None)

    made = []

    def stop_after_two(path):
        made.append(path)
        if len(made) == 2:
            raise KeyboardInterrupt  # the run is stopped here
    with pytest.raises(KeyboardInterrupt):
        build(pipe, "tiny-unet", grid, tmp_path / "part", log=lambda m: None, on_shard=stop_after_two)
    first = {p: p.stat().st_mtime_ns for p in made}
    assert sorted(p.name for p in (tmp_path / "part" / "shards").iterdir()) == sorted(p.name for p in made)
    again = []
    resumed = build(pipe, "tiny-unet", grid, tmp_path / "part", log=lambda m: None, on_shard=again.append)
    assert len(again) == 4 and not set(again) & set(made)  # only the four missing shards were generated
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    order = np.lexsort((whole.colors, whole.seeds, whole.objects)), np.lexsort((resumed.colors, resumed.seeds, resumed.objects))
    assert np.array_equal(whole.maps[order[0]], resumed.maps[order[1]])
    # a truncated shard (a copy cut short) is named, generated again, and loading never sees half a file
    victim = made[0]
    good = victim.read_bytes()
    with safe_open(str(victim), "pt") as f:
        want = {k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata()  # clone: the file is cut below
    victim.write_bytes(good[: len(good) - 100])
    with pytest.raises(RuntimeError, match=f"{victim.name} is damaged"):
        ProbeDataset.load(tmp_path / "part")
    with pytest.warns(UserWarning, match=f"{victim.name} is damaged"):
        repaired = build(pipe, "tiny-unet", grid, tmp_path / "part", log=lambda m: None, on_shard=again.append)
    assert again[-1] == victim and len(repaired) == len(resumed)
    with safe_open(str(victim), "pt") as f:  # the same maps, images and metadata as before the damage
        assert f.metadata() == want[1] and all(torch.equal(f.get_tensor(k), t) for k, t in want[0].items())
    # a folder built with other settings is refused, not mixed
    with pytest.raises(ProbingInputError, match="other settings"):
        build(pipe, "tiny-unet", ProbeGrid(**{**grid.__dict__, "template": "a photo of a {color} {object}"}),
              tmp_path / "part", log=lambda m: None)


def test_split_words_are_summed_or_refused(pipes, tmp_path):
    pipe = pipes("tiny-sd3")
    grid = dict(GRID, colors=["red", "purple"])  # the tiny tokenizers split 'purple' into 'pur' + 'ple'
    with pytest.raises(ProbingInputError, match="splits these words.*'purple'"):
        build(pipe, "tiny-sd3", ProbeGrid(**grid, split_words="refuse"), tmp_path / "r", log=lambda m: None)
    assert not (tmp_path / "r").exists()
    data = build(pipe, "tiny-sd3", ProbeGrid(**grid), tmp_path / "s", log=lambda m: None)
    pieces = data.meta["pieces"]["purple"]
    assert len(pieces["clip"]) > 1 and "".join(pieces["clip"]) == "purple</w>"  # the pieces, recorded and summed
    assert len(pieces["t5"]) == 2 and data.meta["pieces"]["red"] == {"clip": ["red</w>"], "t5": ["▁red"]}


def test_words_missing_from_the_prompt_are_refused_before_generating(pipes, tmp_path):
    pipe = pipes("tiny-unet")
    with pytest.raises(ProbingInputError, match=r"has no \{color\}"):
        build(pipe, "tiny-unet", ProbeGrid(**dict(GRID, template="a photo of a {object}")), tmp_path / "a")
    # the tiny CLIP keeps 16 tokens: a colour word at the end of a long prompt is truncated away
    long = "a {object}" + " on a" * 8 + " {color}"
    with pytest.raises(ProbingInputError, match="colour word 'red' is not in the prompt .*truncated"):
        build(pipe, "tiny-unet", ProbeGrid(**dict(GRID, template=long)), tmp_path / "b")
    with pytest.raises(ProbingInputError, match="both colour and object"):
        build(pipe, "tiny-unet", ProbeGrid(**dict(GRID, objects=["red"])), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_study_settings_are_checked_before_any_generation(tmp_path):
    with pytest.raises(ProbingInputError, match="at least 2 colours"):
        probing.run(probing.ProbingConfig(colors=["red"]), out=tmp_path / "one")
    with pytest.raises(ProbingInputError, match="too few samples for 5-fold cross-validation"):
        probing.run(probing.ProbingConfig(seeds=3), out=tmp_path / "few")
    with pytest.raises(ValueError, match="unknown setting.*'colours'"):
        probing.config_from(None, colours=["red"])
    assert not (tmp_path / "one").exists() and not (tmp_path / "few").exists()


def test_cli_reports_bad_probing_input(tmp_path, capsys):
    from dit_probe.cli import main

    rc = main(["run", "probing", "--model", "tiny-unet", "--color", "red", "--out", str(tmp_path)])
    assert rc == 2 and "at least 2 colours" in capsys.readouterr().err


def test_experiment_configs_are_valid():
    from dit_probe.registry import known_names

    files = sorted(EXPERIMENTS.glob("probing*.yaml"))
    assert len(files) >= 2
    for path in files:
        cfg = probing.config_from(path)
        cfg.check()
        assert all(m in known_names() for m in cfg.models), path


# ----- the study, end to end -----
def test_study_runs_on_every_family(tmp_path):
    cfg = probing.ProbingConfig(models=["tiny-sd3", "tiny-sd3.5", "tiny-flux", "tiny-unet"], colors=["red", "blue"],
                                objects=["car", "bus"], seeds=2, folds=2, num_inference_steps=2, step_stride=1,
                                bootstrap=50, n_jobs=1, grid=None)
    table = probing.run(cfg, out=tmp_path, log=lambda m: None)
    assert set(table.model) == set(cfg.models)
    streams = {"tiny-sd3": {"clip", "t5"}, "tiny-sd3.5": {"clip", "t5"}, "tiny-flux": {"t5"}, "tiny-unet": {"clip"}}
    for model, t in table.groupby("model"):
        data = ProbeDataset.load(tmp_path / t.dataset.iloc[0])
        maps = t[t.features == "maps"]
        units = {(r.layer, r.step) for r in maps.itertuples()}
        want = {(lay, str(s)) for lay in data.layers + ["mean"] for s in data.steps + ["mean"]}
        assert units == want, model
        text = t[t.features != "maps"]
        assert set(text.features) == {f"text-encoder/{s}" for s in streams[model]}, model
        assert set(text.metric[text["class"] == "all"]) >= {"text_object", "text_color"}
        p = probing.pooled(t, model)
        for metric, scaler in (("accuracy", None), ("leakage", "source"), ("leakage_own_scaler", "own")):
            assert p[metric].value == pytest.approx(_sklearn_transfer(data, cfg, scaler)), (model, metric)
    flux_layers = set(table[table.model == "tiny-flux"].layer)
    assert any("single" in lay for lay in flux_layers) and any("double" in lay or "joint" in lay for lay in flux_layers)
    folder = tmp_path / table[table.model == "tiny-sd3.5"].dataset.iloc[0]
    assert json.loads((folder / "dataset.json").read_text())["family"] == "sd3"


def _sklearn_transfer(data, cfg, scaler=None, train="color", test="object"):
    """Accuracy of the multiclass colour probe on the maps pooled over layers and steps, with scikit-learn
    alone: trained on ``train`` maps with GroupKFold by seed; measured on held-out ``train`` maps
    (scaler None), or on ``test`` maps standardised with the training maps' scaler ('source') or with
    their own training-fold scaler ('own')."""
    X, Xt = data.features(train, None, None, cfg.normalise), data.features(test, None, None, cfg.normalise)
    y = np.unique(data.colors, return_inverse=True)[1]
    pred = np.zeros(len(y), int)
    for tr, te in GroupKFold(n_splits=cfg.folds).split(X, y, data.seeds):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=2000)).fit(X[tr], y[tr])
        if scaler is None:
            pred[te] = clf.predict(X[te])
        elif scaler == "source":
            pred[te] = clf.predict(Xt[te])
        else:
            pred[te] = clf[-1].predict(StandardScaler().fit(Xt[tr]).transform(Xt[te]))
    return accuracy_score(y, pred)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The reduced toy configuration (the documented run uses 8 colours x 8 shapes x 8 seeds)."""
    out = tmp_path_factory.mktemp("probing")
    cfg = probing.ProbingConfig(colors=["red", "green", "blue", "yellow"], objects=["circle", "star"], seeds=5,
                                step_stride=6, bootstrap=200)
    logs = []
    table = probing.run(cfg, out=out, log=logs.append)
    return cfg, out, table, logs


def test_toy_colour_probe_beats_chance_clearly(toy_run):
    cfg, out, table, _ = toy_run
    for model in ("toy-mmdit", "toy-unet"):
        p = probing.pooled(table, model)
        acc = p["accuracy"]
        # 4 colours: chance 0.25. Measured on this configuration: 0.60 for both models.
        assert acc.value >= 0.45 and acc.ci_low > acc.chance and acc.ci_low > acc.shuffled, model
        assert abs(acc.shuffled - 0.25) < 0.15
        data = ProbeDataset.load(out / table[table.model == model].dataset.iloc[0])
        assert p["leakage"].value == pytest.approx(_sklearn_transfer(data, cfg, "source")), model
        assert p["leakage_own_scaler"].value == pytest.approx(_sklearn_transfer(data, cfg, "own")), model
        # direct: trained and tested on the object-word maps
        assert p["direct"].value == pytest.approx(_sklearn_transfer(data, cfg, train="object")), model


def test_toy_run_writes_table_and_figures_and_resumes(toy_run):
    cfg, out, table, _ = toy_run
    saved = pd.read_csv(out / "probing.csv", dtype={"step": str, "class": str})
    assert len(saved) == len(table) and set(saved.direction) == {"color", "object"}
    for name in ("probing-fig7.png", "probing-layers-steps.png", "probing-example-maps.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
    assert "probing-controls.md" in probing.STUDY.figure_files
    controls = (out / "figures" / "probing-controls.md").read_text()
    for model in ("toy-mmdit", "toy-unet"):  # each model's pooled numbers, as in the table
        section = controls.split(f"## {model}")[1].split("## ")[0]
        p = probing.pooled(saved, model)
        text = probing.text_rows(saved, model)["text_object", "clip"]
        for label, r in (("| **direct**", p["direct"]), ("| transfer, scaler `own`", p["leakage_own_scaler"]),
                         ("| text encoder: object word, clip", text)):
            line = next(ln for ln in section.splitlines() if ln.startswith(label))
            cells = [c.strip() for c in line.split("|")]
            assert cells[3] == f"{r.value:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" and cells[-2] == "0.250", (model, label)
        assert "40 images (4 colours x 2 objects x 5 seeds)" in section
    assert (saved[saved.model == "toy-mmdit"].judged_color_match >= 0.9).all()  # the generations show the prompted colour
    logs = []
    again = probing.run(cfg, out=out, log=logs.append)  # everything is on disk: nothing is recomputed
    assert json.loads((out / "run.json").read_text())["computed"] == 0
    pd.testing.assert_frame_equal(again.reset_index(drop=True), saved, check_dtype=False)
