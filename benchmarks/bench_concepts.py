"""ConceptAttention's cost: a generation with ``concept_maps`` of 10 concepts on every block against the
plain generation, at SD3-medium width (2 joint blocks of 24 heads x 64, 4096 image + 333 text tokens, real
architecture with random weights, 1 step, no CFG) and on narrow Flux (2 double + 2 single blocks,
1024 image + 512 text tokens, 2 steps).

    python benchmarks/bench_concepts.py        # a few minutes on 2 CPU cores (results-concepts.json)

Time: median over repeats, the modes taking turns in one process. Memory: each mode in a fresh process,
the peak RSS over its first generation and its growth over the built pipeline.
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

CONCEPTS = ["car", "red", "blue", "sky", "tree", "house", "dog", "cat", "white", "background"]
CASES = {
    "sd3-medium-width": "SD3-medium: 2 joint blocks at true width (24 heads x 64); 4096 image + 333 text tokens; 1 step",
    "narrow-flux": "Flux layout: 2 double + 2 single blocks (2 heads x 16); 1024 image + 512 text tokens; 2 steps",
}
MODES = ("plain", "concepts")


def _setup(name):
    import torch

    from dit_probe.architectures import random_text_inputs, real_pipeline
    from dit_probe.attention import concept_maps
    from dit_probe.tiny import tiny_flux

    embeddings = None
    if name == "sd3-medium-width":  # no text encoders at true size: random prompt and concept embeddings
        pipe = real_pipeline("sd3-medium", layers=2)
        call = dict(height=1024, width=1024, guidance_scale=1.0, num_inference_steps=1, output_type="latent",
                    **random_text_inputs("sd3-medium", cfg=False))
        dim = pipe.transformer.config.joint_attention_dim
        embeddings = torch.randn(len(CONCEPTS), dim, generator=torch.Generator().manual_seed(1))
    else:
        pipe = tiny_flux(num_layers=2, num_single_layers=2, t5_length=512)
        call = dict(prompt="a red car on a blue background", height=128, width=128, max_sequence_length=512,
                    guidance_scale=3.5, num_inference_steps=2, output_type="latent")
    pipe.set_progress_bar_config(disable=True)

    def generate(mode):
        g = torch.Generator().manual_seed(0)
        if mode == "plain":
            return pipe(generator=g, **call).images
        with concept_maps(pipe, CONCEPTS, embeddings=embeddings) as cm:
            out = pipe(generator=g, **call).images
        cm.tensor()  # the maps, assembled
        return out

    return generate


def timing(name, repeats):
    return interleaved_medians(_setup(name), MODES, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results-concepts.json")))
    args = ap.parse_args()
    if args.child:
        name, what = args.child
        if what == "time":
            result = timing(name, args.repeats)
        else:
            generate = _setup(name)  # built first: the growth is the generation's own
            result = peak_rss(lambda: generate(what))
        print(json.dumps(result))
        return
    import torch

    results = {}
    for name in CASES:
        def run(what, name=name):
            return child(__file__, "--child", name, what, "--repeats", str(args.repeats))

        times = run("time")
        results[name] = {m: {"time_s": times[m], **run(m)} for m in MODES}
        print(name, json.dumps(results[name]), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    Path(args.out).write_text(json.dumps({"machine": machine, "repeats": args.repeats, "concepts": len(CONCEPTS),
                                          "results": results}, indent=1))
    print(f"\nmachine: {machine}; median of {args.repeats}; {len(CONCEPTS)} concepts on every block")
    print("| case | mode | time (s) | time / plain | peak RSS (MB) | peak / plain | growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        plain = res["plain"]
        for mode, r in res.items():
            print(f"| {name} | {mode} | {r['time_s']:.3f} | {r['time_s'] / plain['time_s']:.2f}x | {r['peak_mb']:.0f} "
                  f"| {r['peak_mb'] / plain['peak_mb']:.2f}x | {r['growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
