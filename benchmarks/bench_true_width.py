"""Cost of recording at real models' true widths and token counts: plain generation, the recorder
(default method, and method='chunked'), and a naive recorder that builds the full softmax.

The models are the shipped real architectures with random weights (``dit_probe.architectures``);
text conditioning is random with the true shapes. Two records on the same words (2 text positions),
all layers, all steps, heads averaged, the conditional branch.

On CPU (the default): blocks at true width (``layers`` blocks of each kind), 1 step, no CFG, float32,
time = median over repeats with the modes taking turns, memory = peak RSS of each mode in a fresh
process over its first generation (and its growth over the built pipeline).
With ``--gpu`` (CUDA): the full denoisers in bfloat16 at 1024² (SD2.1: float16, 768²), 28 steps with
each model's guidance; memory = CUDA peak allocated per mode (reset between modes in one process).

    python benchmarks/bench_true_width.py                 # CPU, block level (about 25 min on 2 cores)
    python benchmarks/bench_true_width.py --gpu           # full denoisers on a CUDA GPU (writes results-gpu.json)
    python benchmarks/bench_true_width.py --only flux-dev # one case
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from memory import peak_rss  # noqa: E402  (benchmarks/memory.py)

# name: (architecture, pixels, CPU: blocks kept, GPU: guidance_scale, dtype)
CASES = {
    "sd3-medium": ("sd3-medium", 1024, 1, 7.0, "bfloat16"),
    "sd3.5-medium-dual": ("sd3.5-medium", 1024, 1, 4.5, "bfloat16"),  # its first blocks have a second, image-only attention
    "flux-dev": ("flux-dev", 1024, 1, 3.5, "bfloat16"),  # one double- and one single-stream block on CPU
    "sd2.1": ("sd2.1", 768, None, 7.5, "float16"),  # the whole UNet
}
GPU_CASES = ["sd3-medium", "flux-dev", "sd3.5-medium-dual", "sd2.1"]
MODES = ["plain", "recorder", "recorder-chunked", "naive"]
TOKENS = [5, 9]  # two text positions: two one-token words


def _setup(name, gpu):
    import torch

    from dit_probe import record
    from dit_probe.architectures import random_text_inputs, real_pipeline

    arch, size, cpu_layers, guidance, dtype = CASES[name]
    if gpu:
        dtype, device, layers, steps = getattr(torch, dtype), "cuda", None, 28
    else:
        dtype, device, layers, steps, guidance = torch.float32, "cpu", cpu_layers, 1, 1.0
    pipe = real_pipeline(arch, dtype=dtype, device=device, layers=layers)
    text = random_text_inputs(arch, dtype=dtype, device=device, cfg=None if guidance > 1 else False)
    if arch.startswith("flux"):
        text.pop("negative_prompt_embeds", None)
    call = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **text)

    def generate(mode):
        g = torch.Generator(device).manual_seed(0)
        if mode == "plain":
            out = pipe(generator=g, **call).images
        else:
            method = {"recorder": "auto", "recorder-chunked": "chunked", "naive": "naive"}[mode]
            with record(pipe, tokens=TOKENS, method=method) as maps:
                out = pipe(generator=g, **call).images
            generate.paths = {p for v in maps.paths.values() for p in v}
        if gpu:
            torch.cuda.synchronize()
        return out

    generate.steps, generate.layers = steps, layers
    return generate


def memory_cpu(name, mode):
    generate = _setup(name, gpu=False)
    return peak_rss(lambda: generate(mode))


def measure(name, repeats, gpu):
    """Median time per mode (modes take turns); on GPU also the CUDA peak per mode."""
    import torch

    generate = _setup(name, gpu)
    out, paths = {}, {}
    for mode in MODES:
        generate(mode)  # warm-up
        paths[mode] = sorted(getattr(generate, "paths", []))
    times = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            t0 = time.perf_counter()
            generate(mode)
            times[mode].append(time.perf_counter() - t0)
    for mode in MODES:
        out[mode] = {"time_s": statistics.median(times[mode]), "paths": paths[mode] if mode != "plain" else []}
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            generate(mode)
            peak = torch.cuda.max_memory_allocated()
            out[mode].update(peak_mb=peak / 2**20, growth_mb=(peak - base) / 2**20)
    out["_steps"], out["_layers"] = generate.steps, generate.layers
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="full denoisers on CUDA (bf16, 28 steps)")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, help="internal: CASE MODE (CPU memory) or CASE time")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        name, what = args.child
        print(json.dumps(measure(name, args.repeats, args.gpu) if what == "time" else memory_cpu(name, what)))
        return
    import torch

    names = args.only or (GPU_CASES if args.gpu else list(CASES))
    out = Path(args.out or Path(__file__).with_name("results-true-width-gpu.json" if args.gpu else "results-true-width.json"))
    results = {}
    for name in names:
        def child(what, name=name):
            cmd = [sys.executable, __file__, "--child", name, what, "--repeats", str(args.repeats)] + (["--gpu"] if args.gpu else [])
            run = subprocess.run(cmd, check=True, capture_output=True, text=True)
            return json.loads(run.stdout.strip().splitlines()[-1])

        res = child("time")
        if not args.gpu:
            for mode in MODES:
                res[mode].update(child(mode))
        results[name] = res
        print(name, json.dumps(res), flush=True)
    if args.gpu:
        machine = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), {torch.get_num_threads()} threads"
    out.write_text(json.dumps({"machine": machine, "gpu": args.gpu, "repeats": args.repeats, "results": results}, indent=1))
    print(f"\nmachine: {machine}; median of {args.repeats}")
    print("| case | tokens (image + text) | layers | mode | path | time (s) | time / plain | peak (MB) | peak / plain | growth (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        arch, size = CASES[name][:2]
        plain = res["plain"]
        for mode in MODES:
            r = res[mode]
            layers = "all" if res["_layers"] is None else f"{res['_layers']} per kind"
            print(f"| {name} {size}² | {_tokens(arch, size)} | {layers} | {mode} | {'/'.join(r['paths']) or '-'} | {r['time_s']:.2f} "
                  f"| {r['time_s'] / plain['time_s']:.3f}x | {r['peak_mb']:.0f} | {r['peak_mb'] / plain['peak_mb']:.3f}x "
                  f"| {r['growth_mb']:.0f} |")
    print(f"results written to {out}")


def _tokens(arch, size):
    from dit_probe.architectures import random_text_inputs

    text = random_text_inputs(arch)["prompt_embeds"].shape[1]
    image = (size // 8) ** 2 if arch == "sd2.1" else (size // 16) ** 2
    return f"{image} + {text}" if arch != "sd2.1" else f"{image} (top level) x {text}"


if __name__ == "__main__":
    main()
