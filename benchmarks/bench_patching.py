"""The cost of one activation-patching sweep: every hidden site and text input of toy-mmdit (11 sites),
patched at every step from a donor generation, against the same number of plain generations.

    python benchmarks/bench_patching.py        # about two minutes on 2 CPU cores (results-patching.json)

Modes, each over 8 captions (toy-mmdit's own sampling: 25 steps, CFG):
- plain: 11 plain generations of the 8 captions, one after another;
- plain-batched: the same 88 images as one batch;
- sweep: the donor generation keeping every site's states, then the 11 patched variants as one batch
  (``causal.patched_generations``);
- sweep-chunked: the same with 8 variants per batch (as the localisation study runs it).
Time: median over repeats, the modes taking turns in one process. Memory: each mode in a fresh process,
the peak RSS over it and its growth over the loaded pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from memory import child, interleaved_medians, peak_rss  # noqa: E402  (benchmarks/memory.py)

MODES = ("plain", "plain-batched", "sweep", "sweep-chunked")
N = 8


def _setup():
    from dit_probe import get_adapter, load_pipeline, sampling_settings
    from dit_probe.causal import donor_states, generate, patched_generations
    from dit_probe.toyworld import scenes

    pipe = load_pipeline("toy-mmdit")
    pipe.set_progress_bar_config(disable=True)
    call = {**sampling_settings(pipe), "output_type": "np"}
    items = scenes(N, seed=9_000_900)
    prompts = [s.caption() for s in items]
    donors = [s.caption().replace(s.color, "blue" if s.color != "blue" else "red", 1) for s in items]
    ad = get_adapter(pipe)
    sites = [h.name for h in [*ad.hidden_sites(), *ad.text_input_sites()]]

    def run(mode):
        if mode == "plain":
            return [generate(pipe, prompts, 0, **call) for _ in sites]
        if mode == "plain-batched":
            return generate(pipe, prompts * len(sites), 0, **call)
        kept = donor_states(pipe, donors, sites, 0, **call)
        chunk = len(sites) if mode == "sweep" else 8
        return [patched_generations(pipe, prompts, donors, [(s, None) for s in sites[i:i + chunk]], 0, kept, **call)
                for i in range(0, len(sites), chunk)]

    return run, len(sites)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results-patching.json")))
    args = ap.parse_args()
    if args.child:
        run, _ = _setup()
        result = interleaved_medians(run, MODES, args.repeats) if args.child == "time" else peak_rss(lambda: run(args.child))
        print(json.dumps(result))
        return
    import torch

    times = child(__file__, "--child", "time", "--repeats", str(args.repeats))
    results = {m: {"time_s": times[m], **child(__file__, "--child", m)} for m in MODES}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    Path(args.out).write_text(json.dumps({"machine": machine, "repeats": args.repeats, "captions": N, "results": results},
                                         indent=1))
    print(f"machine: {machine}; median of {args.repeats}; {N} captions x 11 sites")
    print("| mode | time (s) | time / plain | time / plain-batched | peak RSS (MB) | growth (MB) |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['time_s']:.2f} | {r['time_s'] / results['plain']['time_s']:.2f}x | "
              f"{r['time_s'] / results['plain-batched']['time_s']:.2f}x | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} |")


if __name__ == "__main__":
    main()
