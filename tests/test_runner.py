"""The study runner: units keyed by their settings, damage detected, one-line config errors, the registry-made
command line, accelerate sharding, and the one atomic writer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dit_probe.cli import main
from dit_probe.figures import experiments_index
from dit_probe.io import write_text
from dit_probe.registry import model_identity
from dit_probe.studies import STUDIES, sde
from dit_probe.studies import toy_editing as te
from dit_probe.studies.runner import ConfigError, load_config

ROOT = Path(__file__).parents[1]


def _edits(**kw):
    base = dict(models=["toy-mmdit"], modes=["prompt-only"], attributes=["color"], n=2, alphas=[0.0, 1.0],
                bootstrap=50)
    return te.ToyEditConfig(**{**base, **kw})


def _computed(out) -> int:
    return json.loads((Path(out) / "run.json").read_text())["computed"]


def _units(out) -> list[Path]:
    return sorted((Path(out) / "units").rglob("*.csv"))


# ----- settings-keyed units -----
def test_a_changed_setting_recomputes_and_never_serves_stale_units(tmp_path):
    """The issue's repro: n=2 then n=4 into one folder used to keep the 2 old edits under a config saying 4."""
    te.run(_edits(n=2), out=tmp_path, quiet=True)
    assert len(pd.read_csv(tmp_path / "edits.csv")) == 2 * 2
    te.run(_edits(n=4), out=tmp_path, quiet=True)
    assert len(pd.read_csv(tmp_path / "edits.csv")) == 4 * 2 and _computed(tmp_path) == 1
    assert json.loads((tmp_path / "config.json").read_text())["n"] == 4
    assert len(_units(tmp_path)) == 2  # the n=2 unit is kept, not overwritten
    # back to n=2: its unit is reused, and the table is the n=2 table again
    te.run(_edits(n=2), out=tmp_path, quiet=True)
    assert _computed(tmp_path) == 0 and len(pd.read_csv(tmp_path / "edits.csv")) == 2 * 2


def test_unrelated_changes_recompute_nothing(tmp_path):
    te.run(_edits(), out=tmp_path, quiet=True)
    first = pd.read_csv(tmp_path / "edits.csv")
    te.run(_edits(bootstrap=77), out=tmp_path, figures=tmp_path / "elsewhere", quiet=True)  # report-only + figures
    assert _computed(tmp_path) == 0 and (tmp_path / "elsewhere" / "editing-toy-table.md").exists()
    te.run(_edits(modes=["prompt-only", "dds"]), out=tmp_path, quiet=True)  # a new mode: only its unit
    assert _computed(tmp_path) == 1
    again = pd.read_csv(tmp_path / "edits.csv")
    again = again[again["mode"] == "prompt-only"].reset_index(drop=True)
    pd.testing.assert_frame_equal(again[first.columns], first)


def test_second_study_keys_units_by_settings_too(tmp_path):
    cfg = sde.SDEConfig(models=["toy-unet"], attributes=["color"], n=2, seeds=1, bootstrap=50)
    sde.run(cfg, out=tmp_path, quiet=True)
    sde.run(cfg.model_copy(update={"strengths": [0.5]}), out=tmp_path, quiet=True)
    assert _computed(tmp_path) == 1
    rows = pd.read_csv(tmp_path / "sde.csv")
    assert (rows.strength == 0.5).all() and len(_units(tmp_path)) == 2


def test_unit_keys_hold_the_model_identity():
    assert model_identity("toy-mmdit") != model_identity("toy-unet")
    assert model_identity("tiny-sd3") == "tiny-sd3" and len(model_identity("toy-mmdit")) == 16


def test_model_identity_of_a_folder_follows_its_weights(tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(ROOT / "dit_probe" / "toyworld" / "pipelines" / "toy-unet", folder)
    before = model_identity(str(folder))
    model_identity.cache_clear()
    weights = next(folder.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_identity(str(folder)) != before


# ----- damage -----
@pytest.mark.parametrize("damage", ["truncate", "edit", "no-manifest"])
def test_a_damaged_unit_is_named_and_recomputed(tmp_path, damage):
    te.run(_edits(), out=tmp_path, quiet=True)
    [unit] = _units(tmp_path)
    good = unit.read_bytes()
    if damage == "truncate":
        unit.write_bytes(good[: len(good) // 2])
    elif damage == "edit":
        unit.write_text(unit.read_text().replace("True", "False", 1))
    else:
        unit.with_suffix(".json").unlink()
    logs = []
    te.run(_edits(), out=tmp_path, log=logs.append)
    assert any(str(unit) in m and "recomputing" in m for m in logs), logs
    assert _computed(tmp_path) == 1 and unit.read_bytes() == good  # recomputed, identically


def test_damaged_example_arrays_are_recomputed(tmp_path):
    """A second study, with an .npz beside the csv (semantic-loss examples)."""
    from dit_probe.studies import semantic_loss as sl

    cfg = sl.SemanticLossConfig(models=["toy-mmdit"], attributes=["color"], strengths=[0.5], n=2, seeds=1,
                                prompts=["full"], bootstrap=50)
    sl.run(cfg, out=tmp_path, quiet=True)
    [npz] = (tmp_path / "units").rglob("*.npz")
    good = npz.read_bytes()
    npz.write_bytes(good[:100])
    logs = []
    sl.run(cfg, out=tmp_path, log=logs.append)
    assert any(str(npz) in m for m in logs) and _computed(tmp_path) == 1 and npz.read_bytes() == good


# ----- configs -----
@pytest.mark.parametrize("text, says", [
    ("n: ten\n", "n: Input should be a valid integer"),
    ("attributes: color\n", "attributes: Input should be a valid list"),
    ("colour: [red]\n", "unknown setting 'colour'"),
    ("n: [3\n", "malformed YAML at line 2"),
    ("- n: 3\n", "must hold a mapping"),
])
def test_bad_config_files_are_one_line_naming_key_and_file(tmp_path, capsys, text, says):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}.*" if "mapping" not in says else str(path)):
        load_config(te.ToyEditConfig, path)
    out = tmp_path / "out"
    assert main(["run", "toy-edits", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and str(path) in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_command_line_values_are_validated_like_the_file(tmp_path, capsys):
    assert main(["run", "toy-edits", "--n", "ten", "--out", str(tmp_path / "o")]) == 2
    assert "option: n: Input should be a valid integer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    cfg = load_config(te.ToyEditConfig, ROOT / "experiments" / "toy-edits.yaml", n=5, modes=["dds"])
    assert cfg.n == 5 and cfg.modes == ["dds"] and cfg.attributes == ["color", "size", "shape"]


def test_each_study_has_its_own_options_and_help(capsys):
    helps = {}
    for name in STUDIES:
        with pytest.raises(SystemExit) as e:
            main(["run", name, "--help"])
        assert e.value.code == 0
        helps[name] = capsys.readouterr().out
    assert "--folds" in helps["probing"] and "--folds" not in helps["sde"]
    assert "--distill" in helps["toy-edits"] and "--norm" in helps["sde"] and "--guide" in helps["sds-guidance"]
    with pytest.raises(SystemExit) as e:  # an option of another study (alpha-threshold) is refused
        main(["run", "hsds-ablation", "--tolerance", "0.1"])
    assert e.value.code == 2 and "unrecognized arguments: --tolerance" in capsys.readouterr().err


def test_every_config_field_reaches_the_study(tmp_path, monkeypatch):
    """No option is silently ignored: each flag lands in the config the study runs with."""
    seen = {}
    monkeypatch.setattr(STUDIES["hsds-ablation"].__class__, "run",
                        lambda self, cfg, **kw: seen.update(cfg=cfg, kw=kw))
    assert main(["run", "hsds-ablation", "--steps", "2", "--lam", "0.3", "--lam", "0.7", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].num_inference_steps == 2 and seen["cfg"].lams == [0.3, 0.7]


# ----- registry and indexes -----
def test_experiments_index_is_made_from_the_registry():
    assert (ROOT / "experiments" / "README.md").read_text() == experiments_index()
    for s in STUDIES.values():
        for cfg in filter(None, (s.toy_config, s.paper_config)):
            load_config(s.config, ROOT / "experiments" / cfg)


# ----- files -----
def test_atomic_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.md", "x")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == "0o644" and not list(tmp_path.glob(".*tmp"))


# ----- sharding -----
def test_two_processes_give_the_table_of_one(tmp_path):
    config = tmp_path / "c.yaml"  # in a file: torchrun would take --n for an abbreviation of its own options
    config.write_text("models: [toy-mmdit, toy-unet]\nmodes: [prompt-only]\nattributes: [color, size]\nn: 3\n"
                      "alphas: [0.0, 1.0]\nbootstrap: 100\n")
    args = ["run", "toy-edits", "--config", str(config), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "dit_probe.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # torchrun starts the processes; accelerate's PartialState sees them (gloo on a CPU)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "dit_probe.cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["processes"] == 2 and run["computed"] == 4
    made = {json.loads(p.read_text())["pid"] for p in (tmp_path / "two" / "units").rglob("*.json")}
    assert len(made) == 2  # each process computed its own share
    for name in ("table.md", "summary.csv", "edits.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
