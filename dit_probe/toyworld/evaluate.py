"""Quality of the toy models, measured by the judge: generation, img2img reconstruction, and the
spread of an attribute the prompt leaves out, with 95% bootstrap CIs. Evaluation scenes and noise seeds
start at ``seeds.EVALUATION.start`` (9_000_000): no setting was chosen and nothing was trained on them
(training: scene seeds 0..n_images, renders for the VAE and the judge at 10_000_000 and up; the model
cards before issue 16 were measured on 1_000_000 and up, which the training length was chosen on)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..seeds import EVALUATION
from ..settings import SETTINGS_FILE, sampling_settings
from ..stats import mean_ci
from .judge import Judge
from .world import ATTRIBUTES, Scene, render, scenes

EVAL_SEED = EVALUATION.start


def _to_uint8(images) -> np.ndarray:
    x = images.detach().float().cpu().permute(0, 2, 3, 1).numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def generate(pipe, prompts: list[str], seeds: list[int], batch: int = 64, **overrides) -> np.ndarray:
    """uint8 (N, H, W, 3) images, one noise seed per prompt (independent of the batch size)."""
    kw = {**sampling_settings(pipe), **overrides}
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        with torch.no_grad():
            imgs = pipe(prompts[i : i + batch], generator=gens, output_type="pt", **kw).images
        out.append(_to_uint8(imgs))
    return np.concatenate(out)


def img2img_pipeline(pipe):
    """The img2img pipeline over the same components (shares the modules, no copy)."""
    name = type(pipe).__name__
    cls = getattr(diffusers, name.replace("Pipeline", "Img2ImgPipeline"), None)
    if cls is None:
        raise TypeError(f"no img2img pipeline for {name}")
    extra = {"requires_safety_checker": False} if "safety_checker" in pipe.components else {}
    out = cls(**pipe.components, **extra)
    out.set_progress_bar_config(disable=True)
    out.dit_probe_settings = sampling_settings(pipe)
    return out


def reconstruct(pipe, items: list[Scene], prompts: list[str], seeds: list[int], strength: float, batch: int = 64) -> np.ndarray:
    i2i = img2img_pipeline(pipe)
    kw = {k: v for k, v in sampling_settings(pipe).items() if k not in ("height", "width")}
    out = []
    for i in range(0, len(items), batch):
        init = [Image.fromarray(render(s)) for s in items[i : i + batch]]
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        with torch.no_grad():
            imgs = i2i(prompts[i : i + batch], image=init, strength=strength, generator=gens, output_type="pt", **kw).images
        out.append(_to_uint8(imgs))
    return np.concatenate(out)


def matches(judge: Judge, images: np.ndarray, items: list[Scene]) -> dict[str, np.ndarray]:
    """Per attribute (and 'all'), whether the judge reads each image's prompted value (booleans)."""
    got = judge.read(images)
    out = {a: np.array([g[a] == getattr(s, a) for g, s in zip(got, items)]) for a in ATTRIBUTES}
    out["all"] = np.all([out[a] for a in ATTRIBUTES], axis=0)
    return out


def match_rates(judge: Judge, images: np.ndarray, items: list[Scene], ci: bool = False) -> dict:
    """The share of images whose prompted value the judge reads, per attribute and for all four; with
    ``ci``, also '<attribute>_ci': the 95% bootstrap interval over images."""
    rates = {}
    rng = np.random.default_rng(0)
    for a, hit in matches(judge, images, items).items():
        rates[a] = float(hit.mean())
        if ci:
            rates[f"{a}_ci"] = list(mean_ci(hit.astype(float), 1000, rng)[1:])
    return rates


def entropy_bits(values) -> float:
    counts = Counter(values)
    n = sum(counts.values())
    return max(0.0, float(-sum(c / n * math.log2(c / n) for c in counts.values())))


def evaluate(pipe, n: int = 960, n_omit: int = 120, strength: float = 0.5, judge: Judge | None = None, log=print) -> dict:
    """Generation and reconstruction match rates per attribute, and the spread of omitted attributes."""
    judge = judge or Judge()
    items = scenes(n, seed=EVAL_SEED)
    seeds = list(range(EVAL_SEED, EVAL_SEED + n))
    prompts = [s.caption() for s in items]
    results = {"n": n, "n_omit": n_omit, "settings": sampling_settings(pipe)}
    results["generation"] = match_rates(judge, generate(pipe, prompts, seeds), items, ci=True)
    log(f"generation (n={n}): {results['generation']}")
    results["reconstruction"] = match_rates(judge, reconstruct(pipe, items, prompts, seeds, strength), items, ci=True)
    results["reconstruction"]["strength"] = strength
    log(f"img2img at strength {strength}: {results['reconstruction']}")
    omit = {}
    for k, attr in enumerate(ATTRIBUTES):
        its = scenes(n_omit, seed=EVAL_SEED + 1 + k)
        imgs = generate(pipe, [s.caption(drop=(attr,)) for s in its], list(range(EVAL_SEED + 10_000 * (k + 1), EVAL_SEED + 10_000 * (k + 1) + n_omit)))
        got = judge.read(imgs)
        vals = [g[attr] for g in got]
        kept = match_rates(judge, imgs, its)
        omit[attr] = {
            "entropy_bits": entropy_bits(vals),
            "max_bits": math.log2(len(ATTRIBUTES[attr])),
            "counts": dict(Counter(str(v) for v in vals)),
            "others_match": {a: kept[a] for a in ATTRIBUTES if a != attr},
        }
        log(f"omit {attr}: entropy {omit[attr]['entropy_bits']:.2f} of {omit[attr]['max_bits']:.2f} bits; {omit[attr]['counts']}")
    results["omitted"] = omit
    return results


def _loss_summary(loss_csv, warmup: int) -> str:
    df = pd.read_csv(loss_csv)
    first, last = df.iloc[0], df.iloc[-1]
    # after the warm-up the learning rate only rises where training was extended
    restarts = df["step"][(df["lr"].diff() > 0) & (df["step"] > warmup + 50)].tolist()
    text = (f"Training loss (mean of 50 steps) {first['loss']:.4f} at step {int(first['step'])} -> {last['loss']:.4f} "
            f"at step {int(last['step'])}; {df['seconds'].sum() / 60:.0f} min of training on 1 CPU thread (mostly).")  # fmt: skip
    if restarts:
        text += (f" Trained in phases: extended at step(s) {', '.join(str(int(r) - 50) for r in restarts)} "
                 "(`--steps` raised; the cosine schedule restarts from the new total).")
    return text


def write_model_card(folder, results: dict, loss_csv=None):
    """MODEL_CARD.md for a shipped toy pipeline, from its dit_probe.json and measured ``results``."""
    folder = Path(folder)
    meta = json.loads((folder / SETTINGS_FILE).read_text())
    name, tr = meta["name"], meta["training"]
    arch = {
        "toy-mmdit": "StableDiffusion3Pipeline: SD3Transformer2DModel (4 joint-attention blocks, 4 heads x 32, patch 2: "
        "64 image tokens + 16 text tokens), flow matching (FlowMatchEulerDiscreteScheduler, shift 3); two frozen random "
        "CLIP text encoders side by side, no T5 (max_sequence_length=0)",
        "toy-unet": "StableDiffusionPipeline: UNet2DConditionModel (SD2-style, linear projections, channels 32/64/112, "
        "cross-attention at 16x16 and 8x8), v-prediction on a zero-terminal-SNR scaled-linear schedule (DDIM, trailing "
        "spacing); one frozen random CLIP text encoder",
    }[name]
    g, r = results["generation"], results["reconstruction"]
    def cell(d, a):
        return f"{d[a]:.1%}" + (f" [{d[a + '_ci'][0]:.1%}, {d[a + '_ci'][1]:.1%}]" if a + "_ci" in d else "")

    rows = "\n".join(f"| {a} | {cell(g, a)} | {cell(r, a)} |" for a in ATTRIBUTES)
    omit = "\n".join(
        f"| {a} | {o['entropy_bits']:.2f} | {o['max_bits']:.2f} | {', '.join(f'{k}: {v}' for k, v in sorted(o['counts'].items()))} |"
        for a, o in results["omitted"].items()
    )
    s = meta["sampling"]
    rebuild = ""
    if loss_csv:
        df = pd.read_csv(loss_csv)
        ends = [int(x) - 50 for x in df["step"][(df["lr"].diff() > 0) & (df["step"] > tr["warmup"] + 50)]][1:] + [tr["steps"]]
        kind = name.removeprefix("toy-")
        rebuild = "".join(f", then `dit-probe train-toy --stage {kind} --steps {e}`" for e in ends if e != 10000)
        if rebuild:
            rebuild += ", then `dit-probe train-toy --stage ship`"
    text = f"""# {name}

A small text-to-image model of the dit_probe shapes world (one object of a known shape, colour and size on a
plain background, 32x32 RGB), trained from scratch on a CPU. Part of a matched pair (toy-mmdit, toy-unet): the
same renders, captions, caption dropout, tokenizer, text encoder and VAE, the same number of training steps,
and denoisers of similar size. It exists so the instruments of dit_probe give real, exactly measurable results
offline. It knows nothing outside this world.

- Architecture: {arch}.
- Denoiser parameters: {meta['denoiser_parameters']:,}.
- Shared: CLIP-style BPE tokenizer over the world's vocabulary (every word one token, 16 positions), a frozen
  randomly initialised CLIP text encoder (2 layers, width 64), a VAE trained on renders (32x32x3 -> 16x16x4).
- Data: {tr['n_images']:,} renders (scene seeds 0..{tr['n_images'] - 1}), 8 shapes x 8 colours x 2 sizes x 3
  backgrounds with position jitter. Caption "a {{size}} {{color}} {{shape}} on a {{background}} background"; each
  attribute word dropped with p={tr['p_attribute']} (a dropped shape reads "shape"), the whole caption with p={tr['p_caption']}.
- Training: {tr['steps']:,} steps, batch {tr['batch']}, AdamW lr {tr['lr']} (warm-up {tr['warmup']}, cosine to 10%),
  gradient clipping 1.0, EMA {tr['ema_decay']} (the shipped weights are the EMA), seed {tr['seed']}.
  {_loss_summary(loss_csv, tr['warmup']) if loss_csv else ''}
- Default sampling: {s['num_inference_steps']} steps, guidance {s['guidance_scale']}, 32x32{', max_sequence_length=0' if 'max_sequence_length' in s else ''}
  (`dit_probe.registry.sampling_settings(pipe)` returns them; `load_pipeline("{name}")` loads the pipeline).
- Rebuild: `dit-probe train-toy --steps 10000` (all stages){rebuild}; evaluate:
  `dit-probe evaluate-toy --model {name} --card`.

## Quality, measured by the toy judge

{results['n']} prompts with the full caption, scenes and noise seeds from {EVAL_SEED} on (evaluation-only seeds:
nothing was trained or chosen on them, `dit_probe/seeds.py`); 95% bootstrap CIs over prompts.
Generation: the image from the caption. Reconstruction: img2img of the scene's render at strength
{r['strength']} with the full caption.

| attribute | generation | reconstruction |
|---|---|---|
{rows}
| all four | {cell(g, 'all')} | {cell(r, 'all')} |

A prompt that leaves one attribute out gives a spread of values for it (entropy of the judged values,
{results['n_omit']} generations each, the other attributes in the prompt; a uniform spread gives the maximum):

| omitted | entropy (bits) | maximum | judged values |
|---|---|---|---|
{omit}
"""
    card, quality = folder / "MODEL_CARD.md", "## Quality, measured by the toy judge"
    if loss_csv is None and card.exists() and quality in card.read_text():
        # no training log here (a re-measurement on another machine): keep the card's recipe, renew its numbers
        text = card.read_text().split(quality)[0] + quality + text.split(quality)[1]
    card.write_text(text)
    (folder / "quality.json").write_text(json.dumps(results, indent=2))


def sample_figure(pipes: dict, n: int = 16, seed: int = EVAL_SEED + 500_000):
    """A figure: the same held-out prompts through each model (rows: the render of the prompt's scene,
    then one row per model), each image titled with what the judge reads (mismatches in red)."""
    judge = Judge()
    items = scenes(n, seed=seed)
    prompts = [s.caption() for s in items]
    rows = [("render", np.stack([render(s) for s in items]))]
    rows += [(name, generate(pipe, prompts, list(range(seed, seed + n)))) for name, pipe in pipes.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.35 * len(rows) + 0.3), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        read = judge.read(imgs)
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(imgs[c])
            ax.set_xticks([])
            ax.set_yticks([])
            ok = all(read[c][a] == getattr(items[c], a) for a in ATTRIBUTES)
            label = " ".join(str(read[c][a])[:5] for a in ("size", "color", "shape")) + f"\n{read[c]['background']}"
            ax.set_title(label, fontsize=6, color="black" if ok else "red")
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Held-out prompts (top: the prompt's scene rendered); titles: what the judge reads", fontsize=9)
    fig.tight_layout()
    return fig
