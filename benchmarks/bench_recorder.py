"""Cost of recording attention: a generation without the recorder, with it (all layers, 2 words),
and with a naive recorder that materialises the full softmax (what existing tools do).

Each configuration runs in its own subprocess so peak memory is its own: the peak resident set
size of the process over its first generation (VmHWM, reset just before it through
/proc/self/clear_refs), and that peak's growth over the resident size of the built pipeline.
Times are medians over repeats after that first generation.
Ratios are against the plain run of the same pipeline measured in the same invocation.

    python benchmarks/bench_recorder.py            # all pipelines (a few minutes on 2 CPU cores)
    python benchmarks/bench_recorder.py --quick    # fewer repeats
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

PIPELINES = {
    # name: (builder, call kwargs, words)
    "tiny-sd3": ("tiny-sd3", dict(height=32, width=32, max_sequence_length=16)),
    "tiny-flux": ("tiny-flux", dict(height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="")),
    "tiny-unet": ("tiny-unet", dict(height=32, width=32)),
    # realistic token counts: 128x128 image -> 64x64 latent -> patch 2 -> 1024 image tokens;
    # text 77 CLIP + 256 T5 = 333 tokens; 4 narrow layers (4 heads x 8)
    "narrow-sd3-1024+333": ("narrow", dict(height=128, width=128, max_sequence_length=256)),
}
MODES = ["plain", "recorder", "recorder-chunked", "naive"]
PROMPT = "a red car on a blue background"
WORDS = ["red", "car"]


def _build(kind):
    from dit_probe.tiny import tiny_pipeline, tiny_sd3

    if kind == "narrow":
        return tiny_sd3(num_layers=4, heads=4, clip_length=77, t5_length=256, sample_size=64)
    return tiny_pipeline(kind)


def _rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def run_one(name, mode, repeats, steps):
    import torch

    from dit_probe import record

    torch.manual_seed(0)
    kind, kwargs = PIPELINES[name]
    pipe = _build(kind)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=steps, guidance_scale=4.0, output_type="pt", **kwargs)

    def generate():
        g = torch.Generator().manual_seed(0)
        if mode == "plain":
            return pipe(PROMPT, generator=g, **call).images
        method = {"recorder": "auto", "recorder-chunked": "chunked", "naive": "naive"}[mode]
        with record(pipe, words=WORDS, method=method):
            return pipe(PROMPT, generator=g, **call).images

    # memory: the first generation, from the resident size of the built pipeline
    rss_before = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
    except OSError:
        pass
    generate()
    peak = _rss_kb("VmHWM")
    # time: warm generations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_rss_mb": peak / 1024, "peak_growth_mb": (peak - rss_before) / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=list(PIPELINES))
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    repeats, steps = (3, 4) if args.quick else (7, 4)
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], repeats, steps)))
        return
    import torch

    results = {}
    for name in args.only:
        results[name] = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", name, mode] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[name][mode] = json.loads(out)
            print(f"{name:<22} {mode:<17} {results[name][mode]}", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    Path(args.out).write_text(json.dumps({"machine": machine, "steps": steps, "repeats": repeats, "results": results}, indent=1))
    print(f"\nmachine: {machine}; {steps} steps, CFG, median of {repeats}")
    print("| pipeline | mode | time (s) | time / plain | peak RSS (MB) | peak RSS / plain | peak growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        plain = res["plain"]
        for mode, r in res.items():
            print(f"| {name} | {mode} | {r['time_s']:.3f} | {r['time_s'] / plain['time_s']:.2f}x | {r['peak_rss_mb']:.0f} "
                  f"| {r['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x | {r['peak_growth_mb']:.1f} |")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
