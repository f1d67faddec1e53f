"""Command line: ``dit-probe models | record | demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_models(args):
    from .registry import MODELS
    from .tiny import TINY

    print(f"{'name':<14} {'family':<6} {'hub id':<52} settings")
    for m in MODELS.values():
        print(f"{m.name:<14} {m.family:<6} {m.hub_id:<52} cfg {m.guidance_scale}, {m.num_inference_steps} steps, "
              f"strength {m.strength}, {m.resolution}px{'  (gated)' if m.gated else ''}")
    for name in TINY:
        print(f"{name:<14} {'':<6} {'(built offline, random weights: for code paths only)':<52}")
    return 0


def _generate_and_record(model, prompts, words, steps, guidance, seed, size, layers=None, pipe=None):
    import torch

    from .adapters import get_adapter
    from .attention import record
    from .registry import MODELS, load_pipeline

    pipe = pipe or load_pipeline(model)
    spec = MODELS.get(model)
    steps = steps or (spec.num_inference_steps if spec else 10)
    guidance = guidance if guidance is not None else (spec.guidance_scale if spec else 4.0)
    size = size or (spec.resolution if spec else 32)
    kwargs = {}
    if get_adapter(pipe).family != "unet" and model.startswith("tiny"):
        kwargs["max_sequence_length"] = 16
    generator = torch.Generator().manual_seed(seed)
    with record(pipe, words=words, layers=layers) as maps:
        images = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="pt", **kwargs).images
    return maps, images


def _cmd_record(args):
    from .attention.plot import plot_layer_step_grid, plot_word_maps

    out = Path(args.out)
    maps, images = _generate_and_record(args.model, args.prompt, args.word, args.steps, args.guidance,
                                        args.seed, args.size, args.layer)
    maps.save(out / "maps")
    fig = plot_word_maps(maps, images=images)
    fig.savefig(out / "word_maps.png", dpi=120)
    fig = plot_layer_step_grid(maps, maps.words[0])
    fig.savefig(out / "layer_step_grid.png", dpi=120)
    print(maps)
    print(f"maps:    {out / 'maps'}\nfigures: {out / 'word_maps.png'}, {out / 'layer_step_grid.png'}")
    return 0


def _cmd_demo(args):
    """The main job on the embedded default: record and plot attention maps offline."""
    from .attention.plot import plot_word_maps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = ["a red car on a blue background", "a red purple bicycle on a white background"]
    import matplotlib.pyplot as plt

    rows = []
    for model in ("tiny-sd3", "tiny-flux", "tiny-unet"):
        maps, images = _generate_and_record(model, prompts, ["red", "background"],
                                            steps=4, guidance=4.0, seed=0, size=32)
        maps.save(out / f"maps-{model}")
        fig = plot_word_maps(maps, images=images)
        path = out / f"demo-{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        rows.append((model, maps, path))
    print("dit_probe demo: recorded image->text attention on tiny offline pipelines (random weights:")
    print("the maps exercise the instruments; they carry no meaning until trained models are used).")
    for model, maps, path in rows:
        print(f"  {model:<10} {maps}\n             figure: {path}")
    print(f"results in {out.resolve()}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dit-probe", description=__doc__.split("\n")[0] + " Attention recording and "
                                "probing for SD3 / SD3.5 / Flux / SD2.1 (see README).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("models", help="list the model registry and the tiny offline pipelines")
    r = sub.add_parser("record", help="generate, record attention maps of words, save maps and figures")
    r.add_argument("--model", required=True, help="registry name, tiny pipeline name or pipeline folder")
    r.add_argument("--prompt", required=True, action="append", help="prompt (repeat for a batch)")
    r.add_argument("--word", required=True, action="append", help="word to record (repeatable)")
    r.add_argument("--layer", action="append", help="layer name or glob (repeatable); default all")
    r.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    r.add_argument("--guidance", type=float, default=None)
    r.add_argument("--size", type=int, default=None, help="image height and width in pixels")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="outputs/record")
    d = sub.add_parser("demo", help="the main job on the embedded default (offline, CPU, seconds)")
    d.add_argument("--out", default="outputs/demo")
    args = p.parse_args(argv)
    try:
        return {"models": _cmd_models, "record": _cmd_record, "demo": _cmd_demo}[args.cmd](args)
    except (KeyError, ValueError, IndexError, FileNotFoundError, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dit-probe {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
