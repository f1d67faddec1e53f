"""load_pipeline and the command line."""

import pytest
import torch

from dit_probe import AttentionMaps, MODELS, load_pipeline
from dit_probe.cli import main
from dit_probe.registry import PipelineFolderError, WeightsUnavailableError


def test_registry_has_the_paper_models_and_settings():
    for name in ["sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell", "sd2.1", "sd2.1-base"]:
        assert name in MODELS
    assert MODELS["sd3-medium"].guidance_scale == 7.5 and MODELS["sd3-medium"].num_inference_steps == 50
    assert MODELS["sd2.1"].strength == 0.75


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown model 'sd9'.*sd3-medium.*flux-dev.*tiny-unet"):
        load_pipeline("sd9")


def test_pipeline_object_passes_through(pipes):
    pipe = pipes("tiny-unet")
    assert load_pipeline(pipe) is pipe


def test_local_folder_loads_the_same_pipeline(pipes, tmp_path):
    pipe = pipes("tiny-sd3")
    pipe.save_pretrained(tmp_path / "p")
    back = load_pipeline(str(tmp_path / "p"))
    assert type(back).__name__ == "StableDiffusion3Pipeline"
    kw = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="pt")
    a = pipe("a red car", generator=torch.Generator().manual_seed(0), **kw).images
    b = back("a red car", generator=torch.Generator().manual_seed(0), **kw).images
    # weights identical; images equal up to float rounding (the reloaded text encoders may pick
    # another attention implementation than the ones built from config)
    for name in ["transformer", "vae", "text_encoder", "text_encoder_3"]:
        sa, sb = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a - b).abs().max() < 1e-5
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_a_damaged_pipeline_folder_names_the_file(pipes, tmp_path, capsys):
    pipes("tiny-unet").save_pretrained(tmp_path / "p")
    index = tmp_path / "p" / "model_index.json"
    good = index.read_text()
    for text, says in ((good[: len(good) // 2], "is not valid JSON"), ('{"unet": ["diffusers", "UNet2DConditionModel"]}',
                                                                       "names no diffusers pipeline class")):
        index.write_text(text)
        with pytest.raises(PipelineFolderError, match=f"model_index.json {says}.*re-download or re-save"):
            load_pipeline(str(tmp_path / "p"))
        code = main(["record", "--model", str(tmp_path / "p"), "--prompt", "a red car", "--word", "red",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_real_model_without_weights_says_how_to_get_them():
    with pytest.raises(WeightsUnavailableError) as err:
        load_pipeline("sd3-medium")
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in msg and "huggingface-cli login" in msg
    assert "--local-dir" in msg and "tiny-sd3" in msg


def test_cli_models_lists_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "sd3.5-medium" in out and "flux-schnell" in out and "cfg 7.5, 50 steps, strength 0.75" in out


def test_cli_record_writes_maps_and_figures(tmp_path, capsys):
    rc = main(["record", "--model", "tiny-flux", "--prompt", "a red car", "--word", "red", "--word", "car",
               "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    maps = AttentionMaps.load(tmp_path / "maps")
    assert maps.words == ["red", "car"] and maps.steps == [0, 1] and maps.family == "flux"
    assert (tmp_path / "word_maps.png").stat().st_size > 1000
    assert (tmp_path / "grid-red.png").stat().st_size > 1000 and (tmp_path / "steps-car.gif").exists()
    assert maps.images is not None and len(maps.images) == 1  # saved with the maps, for later pictures
    assert str(tmp_path / "word_maps.png") in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["record", "--model", "tiny-unet", "--prompt", "a red car", "--word", "bus", "--out", str(tmp_path)]) == 2
    assert "word 'bus' is not in prompt 'a red car'" in capsys.readouterr().err
    assert main(["record", "--model", "nope", "--prompt", "x", "--word", "x", "--out", str(tmp_path)]) == 2
    assert "Known names" in capsys.readouterr().err


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "record" in capsys.readouterr().out
