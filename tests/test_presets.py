"""Aggregation presets: ``daam`` equals DAAM 0.2.0's own heat maps (the reference file was written by DAAM
0.2.0 under diffusers 0.21.2 on the same tiny SD2-architecture pipeline and latents:
benchmarks/daam_parity); DAAM's layer rule by hand; ``paper`` by hand."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dit_probe import record
from dit_probe.attention import presets

ROOT = Path(__file__).parents[1]


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "daam_parity" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_daam_preset_equals_daam_0_2_0():
    export, compare = _module("export"), _module("compare")
    pipe, latents = export.parity_pipeline()
    pipe.set_progress_bar_config(disable=True)
    inputs = {"prompt": export.PROMPT, "words": export.WORDS, "call": export.CALL}
    ours = compare.ours(pipe, latents, inputs)
    theirs = load_file(ROOT / "tests" / "data" / "daam-0.2.0-tiny.safetensors")
    assert set(theirs) == {"global"} | {f"word/{w}" for w in export.WORDS}
    for key, ref in theirs.items():
        assert ours[key].shape == ref.shape
        assert torch.allclose(ours[key], ref, atol=1e-6, rtol=0), (key, float((ours[key] - ref).abs().max()))
    # the words differ from each other (the comparison is not between constant maps)
    assert not torch.allclose(theirs["word/red"], theirs["word/car"], atol=1e-4)


def test_daam_layer_rule_by_hand():
    maps = SimpleNamespace(layers=["down.0.0.0.cross", "down.1.0.0.cross", "down.2.0.0.cross", "mid.0.0.0.cross",
                                   "up.1.0.0.cross", "up.1.0.0.self", "up.3.0.0.cross"],
                           grids={"down.0.0.0.cross": (64, 64), "down.1.0.0.cross": (48, 48), "down.2.0.0.cross": (8, 8),
                                  "mid.0.0.0.cross": (8, 8), "up.1.0.0.cross": (16, 16), "up.1.0.0.self": (16, 16),
                                  "up.3.0.0.cross": (32, 32)})
    # latent_hw 4096: factors 1, int(sqrt(1)) = 1, 8 (skipped), mid (never), 4, self-attention (never), 2
    assert presets.daam_layers(maps, 4096) == ["down.0.0.0.cross", "down.1.0.0.cross", "up.1.0.0.cross", "up.3.0.0.cross"]
    # latent_hw 9216 (96 x 96): 64x64 -> int(sqrt(2)) = 1, 48x48 -> 2, 8x8 -> 12 (not aggregated), 16x16 -> 6, 32x32 -> 3
    assert presets.daam_layers(maps, 9216) == ["down.0.0.0.cross", "down.1.0.0.cross"]


def test_paper_preset_is_the_mean_of_sum_normalised_maps(pipes):
    pipe = pipes("tiny-unet")
    with record(pipe, words=["red"]) as maps:
        pipe("a red car", num_inference_steps=3, height=32, width=32, generator=torch.Generator().manual_seed(0))
    got = presets.paper(maps, "red", grid=(16, 16))
    assert got.shape == (16, 16) and abs(float(got.sum()) - 1) < 1e-5
    per = []
    for layer in maps.layers:  # one layer and step at a time: a different path through the maps
        for step in maps.steps:
            m = maps.tensor(word="red", layer=layer, step=step, branch="cond", grid=(16, 16))[0, 0, 0, 0, 0, 0]
            per.append(m / m.sum())
    assert torch.allclose(got, torch.stack(per).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="heads='keep'"):
        presets.daam_heat_maps(maps, ["red"], 4096)


def test_daam_clamps_each_map_before_averaging():
    """Bicubic upsampling of a sharp map undershoots; DAAM clamps each (layer, head) map at 0 before the mean,
    so a negative lobe of one head cannot cancel another head's mass."""
    spike = torch.zeros(1, 1, 1, 1, 2, 1, 4, 4)  # (step, layer, branch, batch, head, token, y, x)
    spike[..., 0, 0, 1, 1] = 1.0  # head 0: a spike; head 1: zero
    maps = SimpleNamespace(heads_mode="keep", layers=["up.0.0.0.cross"], grids={"up.0.0.0.cross": (4, 4)},
                           tensor=lambda word, layer, branch: spike)
    got = presets.daam_heat_maps(maps, [5], latent_hw=64)  # 8 x 8 from 4 x 4: factor int(sqrt(4)) = 2
    up = torch.nn.functional.interpolate(spike[0, 0, 0, 0, 0, :, None], size=(8, 8), mode="bicubic")
    assert float(up.min()) < -1e-3  # the undershoot exists
    assert got.shape == (1, 8, 8) and float(got.min()) >= 0
    assert torch.allclose(got[0], up[0, 0].clamp(min=0) / 2)  # head 0 clamped, averaged with the zero head
