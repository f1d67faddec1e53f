"""Step 2 (a separate environment with DAAM 0.2.0 and what it pins: diffusers 0.21.2, transformers 4.30.2;
see docs/localisation.md): DAAM's global heat maps and word heat maps of the exported pipeline.

    /tmp/daamenv/bin/python benchmarks/daam_parity/run_daam.py /tmp/daam-parity
"""

import json
import sys
from pathlib import Path

import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

import daam


def main(folder):
    out = Path(folder)
    inputs = json.loads((out / "inputs.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", safety_checker=None, requires_safety_checker=False)
    # every weight loaded strictly: a key the old libraries name differently must fail here, not be re-initialised
    # (transformers 5 saves the CLIP text model without its "text_model." prefix)
    text = {"text_model." + k: v for k, v in load_file(out / "pipeline/text_encoder/model.safetensors").items()}
    missing, unexpected = pipe.text_encoder.load_state_dict(text, strict=False)
    assert not unexpected and missing == ["text_model.embeddings.position_ids"], (missing, unexpected)
    pipe.unet.load_state_dict(load_file(out / "pipeline/unet/diffusion_pytorch_model.safetensors"), strict=True)
    latents = load_file(out / "latents.safetensors")["latents"]
    with torch.no_grad(), daam.trace(pipe) as tc:
        pipe(inputs["prompt"], latents=latents, **inputs["call"])
        global_map = tc.compute_global_heat_map()
    size = PIL.Image.new("RGB", (inputs["call"]["width"], inputs["call"]["height"]))
    result = {"global": global_map.heat_maps.contiguous()}
    for word in inputs["words"]:
        wm = global_map.compute_word_heat_map(word)
        result[f"word/{word}"] = wm.heatmap.contiguous()
        result[f"image/{word}"] = wm.expand_as(size).contiguous()
    save_file(result, out / "daam.safetensors")
    (out / "daam.json").write_text(json.dumps({"daam": daam.__version__, "latent_hw": tc.latent_hw,
                                               "layers": tc.layer_names}))


if __name__ == "__main__":
    main(sys.argv[1])
