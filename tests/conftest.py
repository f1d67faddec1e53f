import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of waiting on the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from dit_probe.tiny import tiny_pipeline

FAMILIES = ["tiny-sd3", "tiny-sd3.5", "tiny-flux", "tiny-unet", "tiny-pixart", "tiny-sdxl"]


@pytest.fixture(scope="session")
def pipes():
    built = {}

    def get(name):
        if name not in built:
            built[name] = tiny_pipeline(name)
            built[name].set_progress_bar_config(disable=True)
        return built[name]

    return get


def generate(pipe, prompts, steps=3, seed=0, cfg=True, **extra):
    """Generate with fixed settings; CFG on (Flux: true CFG with a negative prompt)."""
    from dit_probe import get_adapter

    kw = dict(height=32, width=32, num_inference_steps=steps, output_type="pt")
    fam = get_adapter(pipe).family
    if fam not in ("unet", "sdxl"):  # the T5 length (the UNet pipelines have no such argument)
        kw["max_sequence_length"] = 16
    if fam == "pixart":  # exact sizes (no resolution binning); no caption cleaning (it needs bs4 and ftfy)
        kw.update(use_resolution_binning=False, clean_caption=False)
    if fam == "flux":
        kw.update(guidance_scale=3.5, true_cfg_scale=4.0 if cfg else 1.0, negative_prompt="a blue sky" if cfg else None)
    else:
        kw["guidance_scale"] = 4.0 if cfg else 1.0
    kw.update(extra)
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kw).images
