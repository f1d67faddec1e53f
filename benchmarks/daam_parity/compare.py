"""Step 3 (this project's environment): dit_probe's ``daam`` preset on the same pipeline and inputs, against
DAAM 0.2.0's output; writes results-daam.json here and the reference file the test suite compares against.

    .venv/bin/python benchmarks/daam_parity/compare.py /tmp/daam-parity
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from dit_probe import get_adapter, record
from dit_probe.attention import presets

HERE = Path(__file__).parent
REFERENCE = HERE.parents[1] / "tests" / "data" / "daam-0.2.0-tiny.safetensors"


def ours(pipe, latents, inputs):
    """dit_probe's global heat maps (DAAM's token range), word maps and image-size word maps."""
    prompt = inputs["prompt"]
    ad = get_adapter(pipe)
    n = len(pipe.tokenizer.tokenize(prompt)) + 2  # DAAM keeps the prompt's tokens, SOS and one more
    with torch.no_grad(), record(pipe, tokens=list(range(n)), heads="keep") as maps:
        pipe(prompt, latents=latents, **inputs["call"])
    hw = presets.daam_latent_hw(pipe)
    out = {"global": presets.daam_heat_maps(maps, list(range(n)), hw)}
    size = (inputs["call"]["height"], inputs["call"]["width"])
    for word in inputs["words"]:
        tokens = sorted({p for ps in ad.word_positions(prompt, word, occurrence="all").values() for p in ps})
        out[f"word/{word}"] = presets.daam(maps, tokens, hw)
        out[f"image/{word}"] = presets.daam(maps, tokens, hw, image_size=size)
    return out


def main(folder):
    folder = Path(folder)
    inputs = json.loads((folder / "inputs.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipeline", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = load_file(folder / "latents.safetensors")["latents"]
    theirs = load_file(folder / "daam.safetensors")
    mine = ours(pipe, latents, inputs)
    report = {}
    for key, ref in theirs.items():
        diff = (mine[key] - ref).abs()
        report[key] = {"shape": list(ref.shape), "max_abs_diff": float(diff.max()), "max_abs": float(ref.abs().max()),
                       "max_rel_diff": float(diff.max() / ref.abs().max())}
        print(f"{key}: shape {tuple(ref.shape)}, max |ours - DAAM| {report[key]['max_abs_diff']:.2e} "
              f"(values up to {report[key]['max_abs']:.3g})")
    meta = json.loads((folder / "daam.json").read_text())
    (HERE / "results-daam.json").write_text(json.dumps({"daam": meta, "inputs": inputs, "comparison": report}, indent=1))
    REFERENCE.parent.mkdir(exist_ok=True)  # the test suite's reference: DAAM's global and word maps
    save_file({k: v for k, v in theirs.items() if not k.startswith("image/")}, REFERENCE)


if __name__ == "__main__":
    main(sys.argv[1])
