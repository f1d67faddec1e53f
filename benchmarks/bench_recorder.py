"""Cost of recording attention: a generation without the recorder, with it (all layers, 2 words),
and with a naive recorder that materialises the full softmax (what existing tools do).

Times: one process per pipeline, the modes taking turns within each repeat (so drift of this
shared 2-core machine hits them alike), median over repeats after a warm-up. Memory: each mode
in its own fresh process, the peak resident set size over its first generation (VmHWM, reset
just before it through /proc/self/clear_refs), and that peak's growth over the resident size of
the built pipeline.
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

from memory import peak_rss  # noqa: E402  (benchmarks/memory.py)

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


def _setup(name):
    import torch

    from dit_probe import record

    torch.manual_seed(0)
    kind, kwargs = PIPELINES[name]
    pipe = _build(kind)
    pipe.set_progress_bar_config(disable=True)
    call = dict(guidance_scale=4.0, output_type="pt", **kwargs)

    def generate(mode, steps):
        g = torch.Generator().manual_seed(0)
        if mode == "plain":
            return pipe(PROMPT, generator=g, num_inference_steps=steps, **call).images
        method = {"recorder": "auto", "recorder-chunked": "chunked", "naive": "naive"}[mode]
        with record(pipe, words=WORDS, method=method):
            return pipe(PROMPT, generator=g, num_inference_steps=steps, **call).images

    return generate


def memory_one(name, mode, steps):
    """Peak RSS over the first generation of one mode, in a fresh process."""
    generate = _setup(name)
    r = peak_rss(lambda: generate(mode, steps))
    return {"peak_rss_mb": r["peak_mb"], "peak_growth_mb": r["growth_mb"]}


def time_all(name, repeats, steps):
    """Median time per mode; the modes take turns within each repeat so drift hits them alike."""
    generate = _setup(name)
    for mode in MODES:
        generate(mode, steps)  # warm-up
    times = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            t0 = time.perf_counter()
            generate(mode, steps)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=list(PIPELINES))
    ap.add_argument("--child", nargs=2, help="internal: PIPELINE MODE, or PIPELINE time")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    repeats, steps = (3, 4) if args.quick else (9, 4)
    if args.child:
        name, what = args.child
        res = time_all(name, repeats, steps) if what == "time" else memory_one(name, what, steps)
        print(json.dumps(res))
        return
    import torch

    results = {}
    for name in args.only:
        def child(what, name=name):
            cmd = [sys.executable, __file__, "--child", name, what] + (["--quick"] if args.quick else [])
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

        times = child("time")
        results[name] = {mode: {"time_s": times[mode], **child(mode)} for mode in MODES}
        print(f"{name:<22} {results[name]}", flush=True)
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
