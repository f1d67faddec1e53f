"""Command line: ``dit-probe models | record | demo | edit | run | figures | train-toy | evaluate-toy``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from .attention import record
from .attention import AttentionMaps
from .attention.plot import plot_word_maps, write_pictures
from .editing import MODES, EIMEditor
from .figures import regenerate
from .registry import MODELS, load_pipeline, sampling_settings
from .studies import STUDIES
from .tiny import TINY
from .toyworld import SHIPPED, TOY_MODELS, Judge
from .toyworld.evaluate import evaluate, sample_figure, write_model_card
from .toyworld.train import TrainConfig
from .toyworld.train import run as train


def _cmd_models(args):
    print(f"{'name':<14} {'family':<6} {'hub id':<52} settings")
    for name in TOY_MODELS:
        family = "sd3" if name == "toy-mmdit" else "unet"
        print(f"{name:<14} {family:<6} {'(shipped with dit_probe: trained toy-world model)':<52} see its MODEL_CARD.md")
    for m in MODELS.values():
        print(f"{m.name:<14} {m.family:<6} {m.hub_id:<52} cfg {m.guidance_scale}, {m.num_inference_steps} steps, "
              f"strength {m.strength}, {m.resolution}px{'  (gated)' if m.gated else ''}")
    for name in TINY:
        print(f"{name:<14} {'':<6} {'(built offline, random weights: for code paths only)':<52}")
    return 0


def _generate_and_record(model, prompts, words, steps, guidance, seed, size, layers=None, pipe=None):
    pipe = pipe or load_pipeline(model)
    kwargs = sampling_settings(pipe)  # the model's defaults; command-line values override them
    for key, value in (("num_inference_steps", steps), ("guidance_scale", guidance), ("height", size), ("width", size)):
        if value is not None:
            kwargs[key] = value
    generator = torch.Generator().manual_seed(seed)
    with record(pipe, words=words, layers=layers) as maps:
        images = pipe(prompts, generator=generator, output_type="pt", **kwargs).images
    return maps, images


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _readable_image(flag: str, path) -> Image.Image:
    """Open an image given on the command line, before any model is loaded: a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist (or is not a file)")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{flag} {path} is not an image that can be read ({type(err).__name__}: {err}); give a PNG "
                         "or JPEG file") from None
    return image


def _cmd_record(args):
    _positive("--steps", args.steps)
    _positive("--size", args.size)
    out = Path(args.out)
    maps, images = _generate_and_record(args.model, args.prompt, args.word, args.steps, args.guidance,
                                        args.seed, args.size, args.layer)
    maps.save(out / "maps", images=images)
    written = write_pictures(maps, out, images=images)
    print(maps)
    print(f"maps:    {out / 'maps'}\npictures: {', '.join(str(p) for p in written)}")
    return 0


def _cmd_maps(args):
    """Pictures from saved maps: a folder written by maps.save (or by `dit-probe record`, which holds maps/)."""
    folder = Path(args.folder)
    if not (folder / "maps.json").exists() and (folder / "maps" / "maps.json").exists():
        folder = folder / "maps"
    maps = AttentionMaps.load(folder)
    words = args.word or None
    if words:
        unknown = [w for w in words if w not in maps.words]
        if unknown:
            raise SystemExit(f"dit-probe maps: {', '.join(map(repr, unknown))} not recorded in {folder}; recorded: "
                             f"{', '.join(maps.words)}")
    if not 0 <= args.batch < maps.batch_size:
        raise SystemExit(f"dit-probe maps: --batch {args.batch} out of range: {maps.batch_size} image(s) recorded")
    out = Path(args.out or folder.parent / "pictures")
    written = write_pictures(maps, out, words=words, batch=args.batch)
    print(maps)
    if maps.images is None:
        print("(no images saved with these maps: maps drawn alone; save them with maps.save(path, images=...))")
    print("\n".join(str(p) for p in written))
    return 0


def _cmd_demo(args):
    """The main job on the embedded default: generate with the toy pair, read the images back with the
    judge, record and plot where the colour, shape and background words attend."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = [("large", "red", "star", "white"), ("small", "blue", "circle", "black")]
    judge = Judge()
    print("dit_probe demo: the toy pair (toy-mmdit: SD3 joint attention; toy-unet: SD2-style cross-attention)")
    for model in ("toy-mmdit", "toy-unet"):
        pipe = load_pipeline(model)
        for size, color, shape, background in scenes:
            prompt = f"a {size} {color} {shape} on a {background} background"
            maps, images = _generate_and_record(model, [prompt], [color, shape, "background"], steps=None,
                                                guidance=None, seed=args.seed, size=None, pipe=pipe)
            name = f"{model}-{color}-{shape}"
            maps.save(out / f"maps-{name}", images=images)
            fig = plot_word_maps(maps, images=images)
            fig.savefig(out / f"demo-{name}.png", dpi=120)
            plt.close(fig)
            seen = judge.read(images)[0]
            print(f"  {model:<9} prompt {prompt!r}\n            judge reads: {seen}"
                  f"\n            attention maps of {maps.words}: {out / f'demo-{name}.png'}")
    print(f"results in {out.resolve()}")
    return 0


def _cmd_run(args):
    """A study from a config file and/or command-line settings (command line wins)."""
    study = STUDIES[args.study]
    overrides = {name: getattr(args, name) for name in study.config.model_fields}
    cfg = study.config_from(args.config, **overrides)
    study.run(cfg, out=args.out, figures=args.figures, quiet=args.quiet)
    return 0


def _value(text: str):
    """A command-line value read as YAML (4 -> int, 0.5 -> float, true -> bool, null -> None); the config's
    types then validate it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flags(name: str, fields, is_list: bool) -> list[str]:
    """--field-name, plus a singular for list fields (--model for models) and --steps for the number of
    denoising steps, where they name no other field."""
    flags = ["--" + name.replace("_", "-")]
    alias = {"num_inference_steps": "steps"}.get(name) or (name[:-1] if is_list and name.endswith("s") else None)
    if alias and alias not in fields:
        flags.insert(0, "--" + alias.replace("_", "-"))
    return flags


def _add_study_parsers(sub) -> None:
    run = sub.add_parser("run", help="run a study: tables and figures (cached by settings, resumes where it stopped)")
    studies = run.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, study in STUDIES.items():
        p = studies.add_parser(name, help=study.help, description=f"{study.help}. Settings come from --config and "
                               "the options below (which override it); see experiments/ and docs/studies.md.")
        p.add_argument("--config", help="YAML/JSON settings (see experiments/)")
        p.add_argument("--out", help=f"results folder (default runs/{name})")
        p.add_argument("--figures", help="figure folder (default <out>/figures; the README's figures: figures/)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
        fields = study.config.model_fields
        for field, info in fields.items():
            is_list = "list" in str(info.annotation)
            default = info.get_default(call_default_factory=True)
            p.add_argument(*_flags(field, fields, is_list), dest=field, type=_value, action="append" if is_list else "store",
                           metavar="VALUE", help=f"{'repeatable; ' if is_list else ''}default {default!r}")


def _cmd_edit(args):
    """Edit one image along a text / HSDS direction at several alphas; write a strip of the results."""
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    EIMEditor._alphas(alphas)  # non-finite alphas fail, and far ones warn, before the model loads
    path = Path(args.image)
    image = _readable_image("--image", path)  # inputs are checked before the model loads
    reference = _readable_image("--reference", args.reference) if args.reference else None
    editor = EIMEditor(load_pipeline(args.model), strength=args.strength)
    result = editor.edit(image, args.source, args.target, alphas, mode=args.mode, seed=args.seed,
                         phrase=args.phrase, reference=reference)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate(list(result.images[0]), axis=1)
    scale = max(1, 256 // strip.shape[0])  # small (toy) images are enlarged so the strip is readable
    Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST).save(out)
    print(f"{args.mode} edit of {path} at alphas {alphas}: {out} (left to right)")
    if args.save_direction:
        print(f"direction: {result.direction.save(args.save_direction)}")
    return 0


def _cmd_train_toy(args):
    _positive("--steps", args.steps)
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, threads=args.threads)
    stages = tuple(args.stage or ("shared", "data", "mmdit", "unet", "ship"))
    train(cfg, stages=stages, ship_to=Path(args.ship_to) if args.ship_to else None)
    if "ship" in stages:
        print("shipped pipelines written; measure them with `dit-probe evaluate-toy`")
    return 0


def _cmd_evaluate_toy(args):
    _positive("--n", args.n)
    if args.n_omit < 0:
        raise ValueError(f"--n-omit must be 0 (skip the omitted-attribute check) or more, got {args.n_omit}")
    for model in args.model or ["toy-mmdit", "toy-unet"]:
        pipe = load_pipeline(model)
        results = evaluate(pipe, n=args.n, n_omit=args.n_omit, log=lambda m, model=model: print(f"{model}: {m}"))
        if args.card:
            kind = model.removeprefix("toy-")
            loss = Path(args.runs) / f"{kind}-loss.csv"
            write_model_card(SHIPPED / model, results, loss if loss.exists() else None)
        else:
            print(json.dumps(results, indent=2))
    if args.figure:
        fig = sample_figure({m: load_pipeline(m) for m in args.model or ["toy-mmdit", "toy-unet"]})
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=130)
        print(f"figure: {args.figure}")
    return 0


def _cmd_figures(args):
    regenerate(figures=args.figures, runs=args.runs, only=args.only)
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
    mp = sub.add_parser("maps", help="pictures from saved maps: overlays on the image, layer x step grids, GIFs over steps")
    mp.add_argument("folder", help="a saved maps folder (maps.save), or a `dit-probe record` output folder")
    mp.add_argument("--word", action="append", help="word to draw (repeatable); default every recorded word")
    mp.add_argument("--batch", type=int, default=0, help="which image of the batch")
    mp.add_argument("--out", default=None, help="where to write (default: pictures/ beside the maps folder)")
    d = sub.add_parser("demo", help="the main job on the embedded default: the toy models (offline, CPU, seconds)")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--seed", type=int, default=0)
    ed = sub.add_parser("edit", help="EIM edit of one image at several alphas; writes a strip of the results")
    ed.add_argument("--model", required=True, help="toy-mmdit, toy-unet, a registry name or a pipeline folder")
    ed.add_argument("--image", required=True, help="the source image (resized to the model's size with a warning)")
    ed.add_argument("--source", required=True, help="prompt describing the source image")
    ed.add_argument("--target", help="the same prompt with the edited words changed")
    ed.add_argument("--alphas", default="0,0.5,1,1.5", help="comma-separated edit degrees (negative: backwards)")
    ed.add_argument("--mode", default="eim", choices=list(MODES))
    ed.add_argument("--phrase", help="target phrase z_s for HSDS / SDS (default: the words the target changes)")
    ed.add_argument("--reference", help="reference image (mode reference)")
    ed.add_argument("--strength", type=float, default=0.75)
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--out", default="outputs/edit.png")
    ed.add_argument("--save-direction", help="also save the direction (safetensors) here")
    _add_study_parsers(sub)
    f = sub.add_parser("figures", help="regenerate every toy figure and table into figures/ and write figures/INDEX.md")
    f.add_argument("--figures", default="figures", help="figure folder")
    f.add_argument("--runs", default="runs", help="study results (resumable caches)")
    f.add_argument("--only", action="append", help="only this entry (repeatable): toy-samples or a study name")
    t = sub.add_parser("train-toy", help="train the toy pair (resumable; several hours on 2 CPU cores)")
    t.add_argument("--out", default="runs/toy", help="run folder: checkpoints, loss logs, caches")
    t.add_argument("--stage", action="append", choices=["shared", "data", "mmdit", "unet", "ship"],
                   help="run only these stages (repeatable); default all, each skipped when already done")
    t.add_argument("--steps", type=int, default=22_000, help="denoiser training steps (both models; the shipped pair: 22,000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    t.add_argument("--ship-to", default=None, help="folder for the finished pipelines (default: inside the package)")
    e = sub.add_parser("evaluate-toy", help="measure a toy model's quality with the judge")
    e.add_argument("--model", action="append", help="toy-mmdit, toy-unet or a folder (repeatable; default both)")
    e.add_argument("--n", type=int, default=960, help="generations with the full caption")
    e.add_argument("--n-omit", type=int, default=120, help="generations per omitted attribute")
    e.add_argument("--card", action="store_true", help="write MODEL_CARD.md and quality.json into the shipped folder")
    e.add_argument("--runs", default="runs/toy", help="training run folder (for the loss log in the card)")
    e.add_argument("--figure", default=None, help="also write a figure of held-out generations here (e.g. figures/toy-samples.png)")
    args = p.parse_args(argv)
    plain_format = warnings.formatwarning  # warnings as one line each, like errors; put back on return
    warnings.formatwarning = lambda message, category, *rest, **kw: f"dit-probe {args.cmd}: warning: {message}\n"
    try:
        return {"models": _cmd_models, "record": _cmd_record, "maps": _cmd_maps, "demo": _cmd_demo, "edit": _cmd_edit, "run": _cmd_run, "figures": _cmd_figures, "train-toy": _cmd_train_toy,
                "evaluate-toy": _cmd_evaluate_toy}[args.cmd](args)
    except (KeyError, ValueError, IndexError, FileNotFoundError, RuntimeError) as err:  # ConfigError is a ValueError
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dit-probe {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain_format


if __name__ == "__main__":
    sys.exit(main())
