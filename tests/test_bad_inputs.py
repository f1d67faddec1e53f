"""What a person plausibly gets wrong, and what each gets: one clear message naming the input and what
to do (API: a dit_probe exception; CLI: exit 2, one line, no traceback), before expensive work starts.
The readers and parsers are also fed generated garbage (hypothesis): they fail only in their own
documented way. docs/bad-inputs.md lists the cases."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dit_probe import AttentionMaps, load_pipeline, record
from dit_probe.attention import MapsFileError
from dit_probe.cli import main
from dit_probe.editing.editor import EditInputError, EIMEditor
from dit_probe.registry import PipelineFolderError
from dit_probe.studies import STUDIES
from dit_probe.studies.runner import ConfigError

from .conftest import generate

NOT_A_TRACEBACK = "Traceback"


# ----- the command line: exit 2, one line naming the input -----
@pytest.fixture
def files(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    good = Image.new("RGB", (32, 32), (255, 0, 0))
    good.save(tmp_path / "red.png")
    head = (tmp_path / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(head[: len(head) // 2])
    return tmp_path


CLI_CASES = [
    # (argv, what the one line must say)
    (["record", "--model", "tiny-sd3", "--prompt", "a red car", "--word", "red", "--steps", "0"], "--steps must be at least 1"),
    (["record", "--model", "tiny-sd3", "--prompt", "a red car", "--word", "red", "--steps", "-3"], "--steps must be at least 1"),
    (["record", "--model", "tiny-sd3", "--prompt", "a red car", "--word", "red", "--size", "0"], "--size must be at least 1"),
    (["record", "--model", "no-such-model", "--prompt", "a red car", "--word", "red"], "unknown model 'no-such-model'"),
    (["record", "--model", "tiny-sd3", "--prompt", "a red car", "--word", "dog", "--steps", "1"], "word 'dog' is not in prompt"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/notes.txt", "--source", "a red star"], "is not an image that can be read"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/empty.png", "--source", "a red star"], "is not an image that can be read"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/cut.png", "--source", "a red star"], "is not an image that can be read"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/missing.png", "--source", "a red star"], "does not exist"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/red.png", "--source", "a red star", "--alphas", "1,x"], "--alphas must be comma-separated numbers"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/red.png", "--source", "a red star", "--alphas", "nan"], "alpha must be a finite number"),
    (["edit", "--model", "toy-mmdit", "--image", "{tmp}/red.png", "--source", "a red star", "--reference", "{tmp}/notes.txt", "--mode", "reference"], "--reference"),
    (["maps", "{tmp}/missing"], "not a saved AttentionMaps folder"),
    (["run", "probing", "--config", "{tmp}/notes.txt"], "must hold a mapping of settings"),
    (["run", "probing", "--config", "{tmp}/missing.yaml"], "does not exist"),
    (["figures", "--only", "nope"], "unknown figure entries ['nope']"),
    (["evaluate-toy", "--n", "0"], "--n must be at least 1"),
    (["evaluate-toy", "--n-omit", "-1"], "--n-omit must be 0"),
    (["evaluate-toy", "--model", "nope"], "unknown model 'nope'"),
    (["train-toy", "--steps", "0", "--out", "{tmp}/run"], "--steps must be at least 1"),
    (["train-toy", "--threads", "-2", "--out", "{tmp}/run"], "--threads must be 0"),
]


@pytest.mark.parametrize("argv,says", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(files, capsys, monkeypatch, argv, says):
    import dit_probe.cli as cli

    loads = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loads.append(a) or load_pipeline(*a, **k))
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and NOT_A_TRACEBACK not in err, err
    assert err.count("error:") == 1
    if argv[0] == "edit":
        assert loads == []  # checked before the model loads


def test_cli_warns_in_one_line_for_risky_alphas_and_non_rgb_images(files):
    """In a fresh process, as a user runs it (pytest would capture the warnings otherwise)."""
    import subprocess
    import sys

    Image.new("RGBA", (32, 32), (255, 0, 0, 128)).save(files / "rgba.png")
    run = subprocess.run([sys.executable, "-m", "dit_probe.cli", "edit", "--model", "toy-mmdit", "--image",
                          str(files / "rgba.png"), "--source", "a large red star on a white background", "--target",
                          "a large blue star on a white background", "--alphas", "0,1e6", "--mode", "prompt-only",
                          "--out", str(files / "e.png")], capture_output=True, text=True)
    err = run.stderr
    assert run.returncode == 0, err
    assert "dit-probe edit: warning: alpha [1000000.0] is far outside" in err
    assert "mode 'RGBA', converted to RGB; its transparency is dropped" in err
    assert NOT_A_TRACEBACK not in err


# ----- the Python API -----
def test_record_bad_inputs(pipes):
    sd3, unet = pipes("tiny-sd3"), pipes("tiny-unet")
    cases = [
        (dict(), ValueError, "nothing to record"),
        (dict(words=["red"], heads="max"), ValueError, "heads must be 'mean' or 'keep'"),
        (dict(words=["red"], branch="neg"), ValueError, "branch must be one of"),
        (dict(words=["red"], method="fast"), ValueError, "method must be"),
        (dict(words=["red"], dtype=torch.int8), ValueError, "storage dtype"),
        (dict(words=["red"], layers=["block.99.joint"]), KeyError, "unknown layer"),
        (dict(words=["red"], layers=[42]), IndexError, "out of range"),
        (dict(words=["red"], relation="image->txt"), ValueError, "relation must be one of"),
        (dict(words=["red"], occurrence=0), ValueError, "occurrence"),
    ]
    for kw, exc, says in cases:
        with pytest.raises(exc, match=says):
            record(sd3, **kw).__enter__()
    with pytest.raises(ValueError, match="text tokens are never updated by cross-attention"):
        record(unet, words=["red"], relation="text->text").__enter__()
    with record(sd3, words=["red"]) as maps:
        generate(sd3, ["a red car"], steps=0) if False else None  # noqa: the pipeline is not called
    with pytest.raises(ValueError, match="no denoiser call"):
        maps.tensor()
    with record(sd3, words=["red"], branch="uncond") as maps:
        generate(sd3, ["a red car"], steps=1, cfg=False)
    with pytest.raises(ValueError, match="branch='uncond' needs classifier-free guidance"):
        maps.tensor()


def test_editor_bad_inputs_fail_before_model_work(pipes):
    editor = EIMEditor(load_pipeline("toy-mmdit"))
    src = "a large red star on a white background"
    cases = [
        (np.zeros((32, 32)), "H x W x 3"),
        (np.zeros((32, 32, 4), dtype=np.uint8), "H x W x 3"),
        (torch.zeros(1, 4, 32, 32), r"\(B, 3, H, W\)"),
        ([np.zeros((32, 32, 3)), np.zeros((16, 16, 3))], "different sizes"),
    ]
    for image, says in cases:
        with pytest.raises(EditInputError, match=says):
            editor.edit(image, src, src.replace("red", "blue"), alphas=[1])
    for alphas, says in [([], "at least one alpha"), ([math.inf], "finite"), ([float("nan")], "finite")]:
        with pytest.raises(EditInputError, match=says):
            editor.edit(np.zeros((32, 32, 3)), src, src.replace("red", "blue"), alphas=alphas)
    with pytest.warns(UserWarning, match="mode 'L', converted to RGB"):
        editor.pixels(Image.new("L", (32, 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        editor.pixels(Image.new("RGB", (32, 32)))  # a plain RGB image at the model's size: silent


def test_damaged_files_name_the_file(tmp_path, pipes):
    sd3 = pipes("tiny-sd3")
    with record(sd3, words=["red"]) as maps:
        generate(sd3, ["a red car"], steps=1)
    folder = maps.save(tmp_path / "m")
    blob = (folder / "maps.safetensors").read_bytes()
    (folder / "maps.safetensors").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(MapsFileError, match="maps.safetensors cannot be read"):
        AttentionMaps.load(folder)
    bad = tmp_path / "pipe"
    bad.mkdir()
    (bad / "model_index.json").write_text("{\n")
    with pytest.raises(PipelineFolderError, match="model_index.json is not valid JSON"):
        load_pipeline(str(bad))


# ----- generated garbage: the readers fail only in their documented way -----
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                      st.dictionaries(st.sampled_from(["family", "layers", "tokens", "grids", "steps", "heads"]),
                                      st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)),
                                      max_size=6).map(lambda d: json.dumps(d).encode())),
       tensors=st.binary(max_size=200))
def test_maps_reader_on_garbage(tmp_path_factory, meta, tensors):
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "maps.json").write_bytes(meta)
    (folder / "maps.safetensors").write_bytes(tensors)
    with pytest.raises(MapsFileError):
        AttentionMaps.load(folder)


@settings(max_examples=40, deadline=None)
@given(content=st.one_of(st.binary(max_size=80), st.dictionaries(st.text(max_size=12), st.one_of(
    st.none(), st.text(max_size=12), st.lists(st.one_of(st.none(), st.text(max_size=8)), max_size=3)), max_size=4).map(
    lambda d: json.dumps(d).encode())))
def test_pipeline_folder_reader_on_garbage(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("pipe")
    (folder / "model_index.json").write_bytes(content)
    with pytest.raises(PipelineFolderError, match="model_index.json"):
        load_pipeline(str(folder))


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(st.text(max_size=80), st.dictionaries(st.sampled_from(["seed", "model", "n_seeds", "layers", "steps",
                                                                             "purpose", "colors", "nope"]),
                                                            st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True),
                                                                      st.text(max_size=6), st.lists(st.integers(), max_size=3)),
                                                            max_size=5).map(json.dumps)))
def test_study_config_parser_on_garbage(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        STUDIES["probing"].config_from(path)
    except ConfigError as err:
        assert str(path) in str(err), err  # every complaint names the file


@settings(max_examples=60, deadline=None)
@given(spec=st.one_of(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True)),
                      st.lists(st.lists(st.floats(-2, 2), min_size=0, max_size=3), max_size=3),
                      st.integers(), st.text(max_size=4)))
def test_query_set_parser_on_garbage(pipes, spec):
    sd3 = pipes("tiny-sd3")
    try:
        rec = record(sd3, relation="image->image", queries={"q": spec})
        rec.__enter__()
        rec.__exit__(None, None, None)
    except ValueError as err:
        assert "query" in str(err), err


def test_judge_source_and_probe_bad_inputs():
    from dit_probe.probing import probe
    from dit_probe.probing.probes import ProbeDataError
    from dit_probe.studies.sources import CelebAError, CelebASource, ToySource
    from dit_probe.toyworld import Judge

    judge = Judge()
    for images, says in [(np.zeros((32, 32)), "shaped \\(N, H, W, 3\\)"), (np.zeros((2, 32, 32, 4), np.uint8), "shaped"),
                         (torch.zeros(1, 3, 16, 16), "reads 32x32 images"),
                         (np.full((1, 32, 32, 3), np.nan, dtype=np.float32), "NaN or infinite")]:
        with pytest.raises(ValueError, match=says):
            judge.read(images)
    with pytest.raises(ValueError, match="at least 1"):
        ToySource().sample(0, seed=1)
    with pytest.raises(KeyError, match="not 'hat'"):
        ToySource().check("hat")
    with pytest.raises(CelebAError, match="does not exist"):
        CelebASource("/nonexistent/celeba")
    X, labels, groups = np.random.default_rng(0).random((10, 4)), ["a", "b"] * 5, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ProbeDataError, match="same images"):
        probe(X, X[:7], labels, groups)
    with pytest.raises(ProbeDataError, match="at least 5 seeds|too few"):
        probe(X, None, labels, [0] * 10)
    X[3, 1] = np.nan
    with pytest.raises(ProbeDataError, match="NaN or infinite features"):
        probe(X, None, labels, groups)
