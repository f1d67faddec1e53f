"""Cost of an EIM edit against a plain img2img of the same image, and batched vs unbatched HSDS.

For each toy model (real diffusers pipelines, 32x32, 25 steps, CFG 5, strength 0.75), one image:
- ``img2img``: diffusers' own Img2Img pipeline over the same components;
- ``prompt-only x1``: the editor with the text direction at one alpha;
- ``eim x1`` / ``eim x4``: text direction + HSDS (20 iterations), one alpha / four alphas in one batch;
- ``hsds batched`` / ``hsds unbatched``: Identify's HSDS loop alone, its two evaluations per iteration
  in one forward pass or in two.
Denoiser rows: the batch rows through the denoiser (a CFG step counts 2). Time: median of the
repeats, the cases taking turns within each repeat in one process.

    python benchmarks/bench_editing.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from dit_probe.adapters import get_adapter  # noqa: E402
from dit_probe.editing import EIMEditor, hsds  # noqa: E402
from dit_probe.registry import load_pipeline, sampling_settings  # noqa: E402
from dit_probe.toyworld import Scene, render  # noqa: E402
from dit_probe.toyworld.evaluate import img2img_pipeline  # noqa: E402

SOURCE = Scene("star", "red", "large", "white", 16, 16)
TARGET = Scene("star", "blue", "large", "white", 16, 16)


def _cases(pipe):
    from PIL import Image

    editor = EIMEditor(pipe)
    i2i = img2img_pipeline(pipe)
    image = render(SOURCE)
    kw = sampling_settings(pipe)
    kw.pop("height", None), kw.pop("width", None)
    enc = editor.encode(image, SOURCE.caption(), 0)
    cond1 = editor._encode_prompts([TARGET.caption()])
    c_s = editor._encode_prompts(["a blue shape"])
    eps = editor._eps_at(enc.t)

    def edit(mode, alphas):
        return lambda: editor.edit(image, SOURCE.caption(), TARGET.caption(), alphas, mode=mode, phrase="a blue shape")

    return {
        "img2img": lambda: i2i(SOURCE.caption(), image=Image.fromarray(image), strength=0.75,
                               generator=torch.Generator().manual_seed(0), output_type="np", **kw),
        "prompt-only x1": edit("prompt-only", [1.0]),
        "eim x1": edit("eim", [1.0]),
        "eim x4": edit("eim", [0.0, 0.5, 1.0, 1.5]),
        "hsds batched": lambda: hsds(eps, enc.zt, cond1, c_s, editor.distill, batched=True),
        "hsds unbatched": lambda: hsds(eps, enc.zt, cond1, c_s, editor.distill, batched=False),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="toy-mmdit,toy-unet")
    args = ap.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                          f"({torch.get_num_threads()} threads)", "date": time.strftime("%Y-%m-%d"), "rows": []}
    for model in args.models.split(","):
        pipe = load_pipeline(model)
        denoiser = get_adapter(pipe).denoiser
        count = {"rows": 0}

        def on_call(module, args, kwargs, count=count):
            x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
            count["rows"] += x.shape[0]

        hook = denoiser.register_forward_pre_hook(on_call, with_kwargs=True)
        cases = _cases(pipe)
        rows, times = {}, {name: [] for name in cases}
        with torch.no_grad():
            for name, fn in cases.items():  # warm-up, and the row count
                count["rows"] = 0
                fn()
                rows[name] = count["rows"]
            for _ in range(args.repeats):
                for name, fn in cases.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        hook.remove()
        base_t, base_r = statistics.median(times["img2img"]), rows["img2img"]
        for name in cases:
            t = statistics.median(times[name])
            results["rows"].append({"model": model, "case": name, "seconds": round(t, 4), "time_ratio": round(t / base_t, 2),
                                    "denoiser_rows": rows[name], "rows_ratio": round(rows[name] / base_r, 2)})
            print(f"{model:<10} {name:<15} {t:7.3f} s  {t / base_t:5.2f}x  rows {rows[name]:4d}  {rows[name] / base_r:5.2f}x")
    Path(__file__).with_name("results-editing.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
