"""Pictures of recorded maps: saved with their images and provenance; `dit-probe maps` draws them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_probe import AttentionMaps, record
from dit_probe.cli import main

from .conftest import generate


def test_maps_save_images_and_provenance(pipes, tmp_path):
    pipe = pipes("tiny-sd3")
    with record(pipe, words=["red", "car"], method="chunked", dtype=torch.float16) as maps:
        images = generate(pipe, ["a red car"], steps=3)
    maps.save(tmp_path / "m", images=images)
    back = AttentionMaps.load(tmp_path / "m")
    expected = (images[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    assert len(back.images) == 1 and np.array_equal(back.images[0], expected)
    settings = json.loads((tmp_path / "m" / "maps.json").read_text())["settings"]
    assert settings["method"] == "chunked" and settings["dtype"] == "float16" and settings["relation"] == "image->text"
    assert settings["words"] == {"red": "red", "car": "car"} and settings["pipeline"] == "StableDiffusion3Pipeline"


def test_dit_probe_maps_writes_overlays_grids_and_gifs(pipes, tmp_path, capsys):
    pipe = pipes("tiny-unet")
    with record(pipe, words=["red", "car"]) as maps:
        images = generate(pipe, ["a red car on a blue background"], steps=3)
    maps.save(tmp_path / "rec" / "maps", images=images)
    assert main(["maps", str(tmp_path / "rec")]) == 0
    pics = tmp_path / "rec" / "pictures"
    assert sorted(p.name for p in pics.iterdir()) == ["grid-car.png", "grid-red.png", "steps-car.gif", "steps-red.gif",
                                                       "word_maps.png"]
    gif = Image.open(pics / "steps-red.gif")
    assert gif.n_frames == 3  # one frame per recorded step
    assert Image.open(pics / "word_maps.png").text["Software"].startswith("dit_probe")
    with pytest.raises(SystemExit, match="'dog' not recorded"):
        main(["maps", str(tmp_path / "rec"), "--word", "dog"])
    with pytest.raises(SystemExit, match="--batch 3 out of range"):
        main(["maps", str(tmp_path / "rec"), "--batch", "3"])


def test_text_to_text_recordings_draw_a_token_matrix(pipes, tmp_path):
    pipe = pipes("tiny-flux")
    with record(pipe, words=["red", "car"], relation="text->text") as maps:
        generate(pipe, ["a red car"], steps=2)
    maps.save(tmp_path / "tt")
    assert main(["maps", str(tmp_path / "tt"), "--out", str(tmp_path / "pics")]) == 0
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["text_matrix.png"]
