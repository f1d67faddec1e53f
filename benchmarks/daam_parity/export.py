"""Step 1 (this project's environment): write the tiny SD2-architecture pipeline (random weights, 77 text
positions), the prompt and the initial latents that DAAM 0.2.0 and dit_probe both run on.

    .venv/bin/python benchmarks/daam_parity/export.py /tmp/daam-parity
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit_probe.tiny import tiny_unet

PROMPT = "a red car on a blue background"
WORDS = ["red", "car", "blue", "background"]
CALL = dict(height=128, width=128, num_inference_steps=4, guidance_scale=4.0)  # a 64 x 64 latent


def parity_pipeline():
    """The tiny SD2-architecture pipeline and initial latents of the comparison."""
    pipe = tiny_unet(text_length=77)  # DAAM reads only layers whose context is 77 tokens
    # DAAM sizes its maps from the config: sample_size x VAE factor 512 means a 64 x 64 latent (4096 queries),
    # and its layer factors (1, 2 here) must be powers of two
    pipe.unet.register_to_config(sample_size=256)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    return pipe, latents


def main(folder):
    out = Path(folder)
    pipe, latents = parity_pipeline()
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    # the old transformers DAAM pins reads a CLIP tokenizer from vocab.json and merges.txt: write them from
    # the saved tokenizer.json (the same vocabulary and merges)
    tok = json.loads((out / "pipeline" / "tokenizer" / "tokenizer.json").read_text())["model"]
    (out / "pipeline" / "tokenizer" / "vocab.json").write_text(json.dumps(tok["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["merges"]]
    (out / "pipeline" / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    save_file({"latents": latents}, out / "latents.safetensors")
    (out / "inputs.json").write_text(json.dumps({"prompt": PROMPT, "words": WORDS, "call": CALL}))


if __name__ == "__main__":
    main(sys.argv[1])
