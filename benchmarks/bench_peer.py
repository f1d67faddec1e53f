"""dit_probe's recorder side by side with attention-map-diffusers 1.0.0 (the nearest tool a researcher
would use instead), on the same pipelines, recording image->text attention of 2 text positions on
every layer and step, heads averaged.

attention-map-diffusers is not a dependency of dit_probe. It declares torchvision, which the CPU torch
of this project cannot use, so install it for this benchmark only, without its dependencies:

    pip install --no-deps attention-map-diffusers==1.0.0
    python benchmarks/bench_peer.py            # about 10 min on 2 CPU cores (results-peer.json)

Modes: a plain generation; dit_probe (`record`); the peer's `AttentionCapture` (its default 'fast'
mode keeps q and k during the run and computes the maps afterwards: `compute()` is inside its time);
for narrow Flux also dit_probe on the double-stream blocks only, the layers the peer records there.
Time: median over repeats, the modes taking turns in one process. Memory: each mode in a fresh
process, the peak RSS over its first generation and its growth over the built pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from memory import child, interleaved_medians, peak_rss  # noqa: E402  (benchmarks/memory.py)

TOKENS = [5, 9]
CASES = {
    # name: (what, steps, call kwargs)
    "narrow-sd3": ("SD3 layout, 4 joint layers of 4 heads x 8; 1024 image + 333 text tokens; CFG", 2,
                   dict(height=128, width=128, max_sequence_length=256, guidance_scale=4.0)),
    "narrow-flux": ("Flux layout, 2 double + 2 single blocks of 2 heads x 16; 1024 image + 512 text tokens; true CFG", 2,
                    dict(height=128, width=128, max_sequence_length=512, guidance_scale=3.5, true_cfg_scale=4.0,
                         negative_prompt="a blue sky")),
    "sd3-medium-width": ("SD3-medium: 2 joint blocks at true width (24 heads x 64); 4096 image + 333 text tokens; "
                         "no CFG", 1, dict(height=1024, width=1024, guidance_scale=1.0)),
}
PROMPT = "a red car on a blue background"


def _modes(name):
    modes = ["plain", "dit_probe", "attention-map-diffusers"]
    return modes + ["dit_probe-double-only"] if name == "narrow-flux" else modes


def _setup(name):
    import torch

    from dit_probe import record
    from dit_probe.architectures import random_text_inputs, real_pipeline
    from dit_probe.tiny import tiny_flux, tiny_sd3

    _, steps, call = CASES[name]
    call = dict(call, num_inference_steps=steps, output_type="latent")
    if name == "narrow-sd3":
        pipe = tiny_sd3(num_layers=4, heads=4, clip_length=77, t5_length=256, sample_size=64)
        call["prompt"] = PROMPT
    elif name == "narrow-flux":
        pipe = tiny_flux(num_layers=2, num_single_layers=2, t5_length=512)
        call["prompt"] = PROMPT
    else:
        pipe = real_pipeline("sd3-medium", layers=2)
        call.update(random_text_inputs("sd3-medium", cfg=False))
    pipe.set_progress_bar_config(disable=True)

    def generate(mode):
        g = torch.Generator().manual_seed(0)
        if mode == "plain":
            return pipe(generator=g, **call).images
        if mode.startswith("dit_probe"):
            layers = "double.*" if mode.endswith("double-only") else None
            with record(pipe, tokens=TOKENS, layers=layers) as maps:
                out = pipe(generator=g, **call).images
            maps.tensor()  # the maps, assembled
            return out
        from attention_map_diffusers import AttentionCapture

        with AttentionCapture(pipe, relations="image->text", layers="all", timesteps="all", heads="mean",
                              tokens=TOKENS) as capture:
            out = pipe(generator=g, **call).images
        capture.compute()  # its fast mode computes the maps from the kept q and k here
        return out

    return generate


def memory(name, mode):
    generate = _setup(name)
    return peak_rss(lambda: generate(mode))


def timing(name, repeats):
    return interleaved_medians(_setup(name), _modes(name), repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results-peer.json")))
    args = ap.parse_args()
    if args.child:
        name, what = args.child
        print(json.dumps(timing(name, args.repeats) if what == "time" else memory(name, what)))
        return
    import torch
    from importlib.metadata import version

    results = {}
    for name in args.only or list(CASES):
        def run(what, name=name):
            return child(__file__, "--child", name, what, "--repeats", str(args.repeats))

        times = run("time")
        results[name] = {m: {"time_s": times[m], **run(m)} for m in _modes(name)}
        print(name, json.dumps(results[name]), flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads; attention-map-diffusers {version('attention-map-diffusers')}")
    Path(args.out).write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": results}, indent=1))
    print(f"\nmachine: {machine}; median of {args.repeats}")
    print("| case | mode | time (s) | time / plain | peak RSS (MB) | peak / plain | growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        plain = res["plain"]
        for mode, r in res.items():
            print(f"| {name} | {mode} | {r['time_s']:.3f} | {r['time_s'] / plain['time_s']:.2f}x | {r['peak_mb']:.0f} "
                  f"| {r['peak_mb'] / plain['peak_mb']:.2f}x | {r['growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
