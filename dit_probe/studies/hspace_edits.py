"""h-space edits on the toy pair (issue 18): do directions in the denoiser's hidden states edit colour as
well as EIM does, and only colour? Are Jacobian directions local, and do they transfer?

Every edit moves a random scene's object to the colour ``target`` ("blue"), starting at a log-SNR matched
per model (``studies.levels``), with these methods:

- ``prompt-only`` and ``eim``: the text side (and HSDS) under the source caption (the reference);
- ``class-mean``: delta h = mean state of generations the judge reads as the target colour minus that of the
  source colour (``editing.hspace.class_mean_direction``; states from ``generations`` images of random
  captions, mean over positions, pooled over the edit interval), added at every step of the interval;
  ``class-mean/projected``: the same with the shape and size class-mean directions projected out (the
  seed's projection); ``class-mean/asym``: applied by the asymmetric reverse process;
- ``asyrp``: a learned delta h_t = f_t(h) (``editing.asyrp``), trained on ``train_n`` other scenes with the
  toy attribute classifier's loss (never the judge) plus reconstruction, applied asymmetrically.
The h-space methods edit under the caption without the colour word ('a large star on a white background'):
under the full caption the text names the source colour at every step. The edit interval is the
Asyrp seed's rule (``edit_interval``, 1 - SSIM as the distance; LPIPS' ImageNet backbone is not available
here) on the training scenes.

The judge reads every image: success (target colour), others preserved, background PSNR over pixels
that are background in source and target (``sources.judge_edits``). The ``jacobian`` part, per image: the
top right singular vector v of d(eps)/dh at the first step (``jacobian_directions``), scaled to the norm of
that image's class-mean delta h, beside the class-mean delta and a random direction of the same norm:
- locality: the share of the pixel change (alpha 1 vs 0) inside the object (the source render's coverage),
  against the object's area share (what an evenly spread change gives);
- transfer: image i's direction applied to image i+1; the cosine between the judge's score changes
  (every attribute's probabilities) on the two images, for v, the class-mean and the random direction.

Results: ``edits.csv``, ``summary.csv`` (means with 95% bootstrap CIs over edits), ``jacobian.csv``,
``table.md``; figures ``hspace-edits.png`` and ``hspace-edits-table.md``.

    dit-probe run hspace-edits --config experiments/hspace-edits-toy.yaml
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..editing import EditDirection
from ..editing.asyrp import asyrp_direction, edit_interval, train_delta_h
from ..editing.hspace import class_mean_direction, denoiser_jacobian, jacobian_directions
from ..hidden import record_states
from ..seeds import EVALUATION
from ..stats import group_cis
from ..toyworld import ATTRIBUTES, Judge, render_many, scenes
from ..toyworld.classifier import load_classifier
from ..toyworld.judge import at_judge_size
from ..toyworld.world import coverage
from .levels import LEVEL_AXES, LEVEL_COLUMNS, apply_level, with_level
from .runner import Report, Study, Unit
from .sources import EditorSettings, background_mask, judge_edits, phrase_for

TEXT_METHODS = ("prompt-only", "eim")
HIDDEN_METHODS = ("class-mean", "class-mean/projected", "class-mean/asym", "asyrp")


class HSpaceEditConfig(EditorSettings):
    sites: dict[str, str] = {"toy-mmdit": "block.02.image", "toy-unet": "mid.out"}
    strengths: list[float] = []
    log_snrs: list[float] = [-3.0]
    target: str = "blue"
    methods: list[str] = [*TEXT_METHODS, *HIDDEN_METHODS, "jacobian"]
    n: int = 24  # edits (scenes whose colour is not the target)
    alphas: list[float] = [0.0, 0.5, 1.0, 1.5, 2.0]
    seed: int = 0  # the evaluated edits
    # what the directions are made from (the interval's scenes, the class means' generations, Asyrp's training
    # scenes): a development seed, so an evaluation run fits nothing on its own seeds
    train_seed: int = 7
    generations: int = 240  # generations read by the judge: the class means
    interval_threshold: float = 0.3  # 1 - SSIM(image, predicted x0) that ends the edit interval
    train_n: int = 32  # Asyrp's training scenes
    asyrp: dict = {"recon": 1.0, "epochs": 6, "lr": 5e-3, "batch_size": 8}
    jacobian_n: int = 12
    jacobian_iters: int = 8

    def check(self):
        super().check()
        if self.target not in ATTRIBUTES["color"]:
            raise ValueError(f"target must be a toy colour {list(ATTRIBUTES['color'])}, got {self.target!r}")
        bad = [m for m in self.methods if m not in (*TEXT_METHODS, *HIDDEN_METHODS, "jacobian")]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; methods: {[*TEXT_METHODS, *HIDDEN_METHODS, 'jacobian']}")
        if 0.0 not in self.alphas or 1.0 not in self.alphas:
            raise ValueError("alphas must include 0.0 and 1.0 (success is read at 1, change against 0)")
        unknown = set(self.asyrp) - {"recon", "epochs", "lr", "batch_size"}
        if unknown:
            raise ValueError(f"asyrp: unknown setting(s) {sorted(unknown)}; valid: recon, epochs, lr, batch_size")
        if self.train_seed in EVALUATION:
            raise ValueError(f"train_seed {self.train_seed} is an evaluation seed: directions are fitted on "
                             "development seeds (dit_probe.seeds), e.g. train_seed: 7")
        if self.n < 2 or self.jacobian_n < 2:
            raise ValueError("n and jacobian_n must be at least 2 (transfer pairs image i with image i+1)")


def site_for(cfg: HSpaceEditConfig, adapter, model: str) -> str:
    """The configured site, else the family's middle: the UNet bottleneck, a DiT's middle image stream."""
    if model in cfg.sites:
        return cfg.sites[model]
    names = [h.name for h in adapter.hidden_sites()]
    image = [n for n in names if n.endswith(".image")]
    return "mid.out" if "mid.out" in names else image[len(image) // 2]


def edit_pairs(n: int, seed: int, target: str):
    """n (source, target) scenes: random scenes whose colour is not ``target``, and the same with it."""
    items = [s for s in scenes(4 * n, seed) if s.color != target][:n]
    return [(s, type(s)(**{**s.to_dict(), "color": target})) for s in items]


def _setup(cfg: HSpaceEditConfig, model: str, shared) -> SimpleNamespace:
    return SimpleNamespace(editor=cfg.editor(model), judge=Judge(), cache={})


def _omit(items):
    return [s.caption(drop=("color",)) for s in items]


def _memo(ctx, key, make):
    if key not in ctx.cache:
        ctx.cache[key] = make()
    return ctx.cache[key]


def _interval(ctx, cfg, level):
    """The edit interval (scheduler-step indices) by the Asyrp rule, on the training scenes."""
    def make():
        train = [s for s, _ in edit_pairs(cfg.train_n, cfg.train_seed * 1000 + 1, cfg.target)]
        enc = ctx.editor.encode(render_many(train, ctx.editor.size), _omit(train), [cfg.train_seed * 100_000 + i for i in range(len(train))])
        return enc, edit_interval(ctx.editor, enc, cfg.interval_threshold)
    return _memo(ctx, ("interval", level), make)


def _class_means(ctx, cfg, site, level):
    """Per colour / shape / size value: the mean state at ``site`` (mean over positions, pooled over the edit
    interval's steps) of generations from random captions, grouped by what the judge reads."""
    def make():
        editor = ctx.editor
        _, steps = _interval(ctx, cfg, level)
        items = scenes(cfg.generations, cfg.train_seed * 1000 + 3)
        g = torch.Generator().manual_seed(cfg.train_seed)
        with torch.no_grad(), record_states(editor.pipe, [site], steps=steps) as states:
            images = editor.pipe([s.caption() for s in items], num_inference_steps=editor.num_inference_steps,
                                 guidance_scale=editor.guidance_scale, generator=g, output_type="np",
                                 **editor._prompt_kwargs).images
        x = states[site].mean(0)  # (generations, channels)
        if images.shape[1] != 32:  # a real model: read at the toy world's resolution
            images = at_judge_size((images * 255).round().astype(np.uint8))
        reads = ctx.judge.read(images)
        means = {}
        for attribute in ("color", "shape", "size"):
            labels = np.array([str(r[attribute]) for r in reads])
            means[attribute] = {v: x[torch.from_numpy(labels == v)].mean(0) for v in ATTRIBUTES[attribute]
                                if (labels == v).sum() >= 3}
        means["all"] = x.mean(0)
        means["states"], means["labels"] = x, [r["color"] for r in reads]
        return means
    return _memo(ctx, ("means", site, level), make)


def _state_shape(ctx, site, enc):
    with torch.no_grad(), record_states(ctx.editor.pipe, [site], tokens="keep") as states:
        ctx.editor._predict(enc.zt[:1], enc.t, enc.cond.map(lambda x: x[:1]), 1.0)
    return tuple(states[site].shape[2:])


def _spread(vectors: torch.Tensor, shape, layout) -> torch.Tensor:
    """(B, C) channel vectors -> (B, *state) deltas equal at every position."""
    return vectors.view(len(vectors), 1, -1) if layout == "tokens" else vectors.view(len(vectors), -1, 1, 1)


def _class_mean_deltas(ctx, cfg, site, level, sources, projected: bool) -> torch.Tensor:
    means = _class_means(ctx, cfg, site, level)
    colour = means["color"]
    if cfg.target not in colour:
        raise ValueError(f"the judge read fewer than 3 of {cfg.generations} generations as {cfg.target}: "
                         "raise generations")
    others = None
    if projected:  # the shape and size directions (each value's mean minus the overall mean)
        others = torch.stack([m - means["all"] for a in ("shape", "size") for m in means[a].values()])
    vecs = []
    for s in sources:
        base = colour.get(s.color, means["all"])  # a source colour too rare in the generations: the overall mean
        states = torch.stack([colour[cfg.target], base])
        vecs.append(class_mean_direction(states, ["target", "source"], "target", "source", remove=others))
    return torch.stack(vecs)


def _direction(ctx, cfg, unit, site, level, pairs, enc) -> EditDirection:
    method = unit["method"]
    _, steps = _interval(ctx, cfg, level)
    layout = ctx.editor.adapter.hidden_site(site).layout
    if method == "asyrp":
        net = _memo(ctx, ("asyrp", site, level), lambda: _train_asyrp(ctx, cfg, site, level))
        return asyrp_direction(site, net, steps, target=cfg.target)
    deltas = _class_mean_deltas(ctx, cfg, site, level, [s for s, _ in pairs], projected=method.endswith("projected"))
    shape = _state_shape(ctx, site, enc)
    return EditDirection(hidden={site: _spread(deltas, shape, layout)}, hidden_steps=steps,
                         asymmetric=method.endswith("asym"), meta={"mode": method, "site": site})


def _train_asyrp(ctx, cfg, site, level):
    enc, steps = _interval(ctx, cfg, level)
    classifier = load_classifier()
    net, _ = train_delta_h(ctx.editor, enc, site, lambda x: classifier.loss(x, "color", cfg.target), steps,
                           seed=cfg.train_seed, **cfg.asyrp)
    return net


def _edits(ctx, unit, cfg, level) -> pd.DataFrame:
    editor, method = ctx.editor, unit["method"]
    site = site_for(cfg, ctx.editor.adapter, unit.model)
    pairs = edit_pairs(cfg.n, cfg.seed * 1000 + 2, cfg.target)
    sources, targets = render_many([s for s, _ in pairs]), render_many([t for _, t in pairs])
    stimuli = render_many([s for s, _ in pairs], editor.size)  # the sources at the model's resolution
    seeds = [cfg.seed * 100_000 + i for i in range(len(pairs))]
    if method in TEXT_METHODS:
        enc = editor.encode(stimuli, [s.caption() for s, _ in pairs], seeds)
        direction = editor.identify(enc, [t.caption() for _, t in pairs], method,
                                    [phrase_for(t, "color") for _, t in pairs])
    else:
        enc = editor.encode(stimuli, _omit([s for s, _ in pairs]), seeds)
        direction = _direction(ctx, cfg, unit, site, level, pairs, enc)
    images = _judged(editor.manipulate(enc, direction, cfg.alphas))
    masks = np.stack([background_mask(s, t) for s, t in pairs])
    rows = judge_edits(ctx.judge, images, [s.attributes for s, _ in pairs], [t.attributes for _, t in pairs], "color",
                       cfg.alphas, sources, masks)
    frame = pd.DataFrame(rows)
    frame.insert(0, "edit_steps", len(direction.hidden_steps) if direction.hidden_steps else np.nan)
    frame.insert(0, "site", site if method not in TEXT_METHODS else "")
    frame.insert(0, "method", method)
    return frame


def _judged(images: np.ndarray) -> np.ndarray:
    """Manipulate's (B, A, H, W, 3) at the judge's 32 x 32 (a no-op for the toy models)."""
    return at_judge_size(images.reshape(-1, *images.shape[2:])).reshape(*images.shape[:2], 32, 32, 3)


def _scores(judge, images) -> np.ndarray:
    s = judge.scores(images)
    return np.concatenate([s[a] for a in ATTRIBUTES], axis=1)


def _jacobian(ctx, unit, cfg, level) -> pd.DataFrame:
    """Locality and transfer of the top Jacobian direction, the class-mean delta and a random direction,
    all scaled to the class-mean delta's norm, added (symmetric) over the edit interval."""
    editor, adapter = ctx.editor, ctx.editor.adapter
    site = site_for(cfg, ctx.editor.adapter, unit.model)
    _, steps = _interval(ctx, cfg, level)
    pairs = edit_pairs(cfg.jacobian_n, cfg.seed * 1000 + 4, cfg.target)
    items = [s for s, _ in pairs]
    enc = editor.encode(render_many(items, editor.size), _omit(items), [cfg.seed * 100_000 + 70_000 + i for i in range(len(items))])
    shape = _state_shape(ctx, site, enc)
    layout = adapter.hidden_site(site).layout
    mean = _spread(_class_mean_deltas(ctx, cfg, site, level, items, projected=False), shape, layout)
    g = torch.Generator().manual_seed(cfg.seed)
    dirs = {"class-mean": mean, "jacobian": [], "random": []}
    for i in range(len(items)):
        f, h0 = denoiser_jacobian(adapter, site, enc.zt[i:i + 1], enc.t, enc.cond.map(lambda x: x[i:i + 1]), 1.0)
        _, v, _ = jacobian_directions(f, h0, k=1, iters=cfg.jacobian_iters, seed=cfg.seed + i)
        norm = mean[i].expand(shape).norm()
        dirs["jacobian"].append(v[0, 0] * norm)  # v[0]: (rows=1, *state)
        r = torch.randn(shape, generator=g)
        dirs["random"].append(r / r.norm() * norm)
    dirs = {k: torch.stack(v) if isinstance(v, list) else v.expand(len(items), *shape) for k, v in dirs.items()}
    plain = _judged(editor.manipulate(enc, EditDirection(), [0.0]))[:, 0]
    base_scores = _scores(ctx.judge, plain)
    area = np.stack([coverage(s) > 0 for s in items])
    nxt = [(i + 1) % len(items) for i in range(len(items))]
    rows = []
    for kind, d in dirs.items():
        own = _judged(editor.manipulate(enc, EditDirection(hidden={site: d}, hidden_steps=steps), [1.0]))[:, 0]
        moved = EditDirection(hidden={site: d[[(j - 1) % len(items) for j in range(len(items))]]}, hidden_steps=steps)
        other = _judged(editor.manipulate(enc, moved, [1.0]))[:, 0]  # image j edited with the direction of image j - 1
        change = np.abs(own.astype(float) - plain.astype(float)).sum(-1)
        d_own, d_other = _scores(ctx.judge, own) - base_scores, _scores(ctx.judge, other) - base_scores
        for i, j in enumerate(nxt):
            total = change[i].sum()
            cos = float(d_own[i] @ d_other[j] / (np.linalg.norm(d_own[i]) * np.linalg.norm(d_other[j]) + 1e-12))
            rows.append(dict(method=kind, site=site, image=i, locality=float(change[i][area[i]].sum() / total) if total else np.nan,
                             object_share=float(area[i].mean()), pixel_change=float(change[i].mean()), transfer_cos=cos,
                             read_color=ctx.judge.read(own[i:i + 1])[0]["color"]))
    return pd.DataFrame(rows)


def _compute(ctx, unit: Unit, cfg: HSpaceEditConfig):
    level = apply_level(ctx.editor, unit["level"])
    frame = _jacobian(ctx, unit, cfg, unit["level"]) if unit["method"] == "jacobian" else _edits(ctx, unit, cfg, unit["level"])
    frame = with_level(frame, level)
    frame.insert(0, "model", unit.model)
    return frame, None


def summarise(edits: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    return group_cis(edits, ["model", "level", "method", "alpha"],
                     ("success", "preserved", "kept_shape", "kept_size", "background_psnr", "target_score"), n_boot,
                     first=[*LEVEL_COLUMNS[1:], "edit_steps"])


def summarise_jacobian(jac: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    return group_cis(jac, ["model", "level", "method"], ("locality", "object_share", "transfer_cos", "pixel_change"),
                     n_boot, first=["log_snr"])


def _ci(r, m, pct=True):
    f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}")
    return f"{f(r[m])} [{f(r[m + '_lo'])}, {f(r[m + '_hi'])}]"


def _table(summary: pd.DataFrame, jac: pd.DataFrame) -> str:
    lines = ["Colour edits to the target at α = 1 (95% bootstrap CIs over edits; α = 0 is the unedited "
             "reconstruction, its success the chance-like floor):", "",
             "| model | log-SNR | method | steps edited | success α=0 → 1 | shape & size kept α=1 | background PSNR α=1 (dB) |",
             "|---|---|---|---|---|---|---|"]
    for (model, level, method), g in summary.groupby(["model", "level", "method"], sort=False):
        z, r = g[g.alpha == 0.0].iloc[0], g[g.alpha == 1.0].iloc[0]
        steps = "all" if pd.isna(r.edit_steps) else int(r.edit_steps)
        lines.append(f"| {model} | {r.log_snr:.2f} | {method} | {steps} | {z.success:.0%} → {_ci(r, 'success')} | "
                     f"{_ci(r, 'preserved')} | {_ci(r, 'background_psnr', pct=False)} |")
    if len(jac):
        lines += ["", "Directions at the same norm (the class-mean delta's), added over the edit interval: locality "
                  "= share of the pixel change inside the object (object share = what an even change gives); "
                  "transfer = cosine of the judge-score changes when image i's direction edits image i+1:", "",
                  "| model | log-SNR | direction | locality | object share | transfer cos | mean pixel change |",
                  "|---|---|---|---|---|---|---|"]
        for r in jac.itertuples():
            r = r._asdict()
            lines.append(f"| {r['model']} | {r['log_snr']:.2f} | {r['method']} | {_ci(r, 'locality')} | "
                         f"{r['object_share']:.0%} | {_ci(r, 'transfer_cos', pct=False)} | {r['pixel_change']:.1f} |")
    return "\n".join(lines) + "\n"


def _figure(summary: pd.DataFrame):
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(2, len(models), figsize=(4.4 * len(models), 6.0), squeeze=False)
    for j, model in enumerate(models):
        for i, (m, label) in enumerate((("success", "success (judge reads the target colour)"),
                                        ("preserved", "shape, size and background kept"))):
            ax = axes[i, j]
            for method, g in summary[summary.model == model].groupby("method", sort=False):
                ax.plot(g.alpha, g[m], marker="o", ms=3, label=method)
                ax.fill_between(g.alpha, g[m + "_lo"], g[m + "_hi"], alpha=0.12)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{model} (log-SNR {summary[summary.model == model].log_snr.iloc[0]:.1f})", fontsize=9)
            ax.set_xlabel("alpha"), ax.set_ylabel(label if j == 0 else "", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _report(cfg: HSpaceEditConfig, results, out) -> Report:
    frames = [r.frame for r in results]
    edits = pd.concat([f for f in frames if "alpha" in f], ignore_index=True)
    jac = pd.concat([f for f in frames if "locality" in f], ignore_index=True) if any("locality" in f for f in frames) else pd.DataFrame()
    summary = summarise(edits, cfg.bootstrap)
    jsum = summarise_jacobian(jac, cfg.bootstrap) if len(jac) else pd.DataFrame()
    table = _table(summary, jsum)
    return Report(summary, files={"edits.csv": edits, "summary.csv": summary, "jacobian.csv": jac,
                                  "jacobian-summary.csv": jsum, "table.md": table},
                  figures={"hspace-edits.png": _figure(summary), "hspace-edits-table.md": table}, text=table)


def _line(frame: pd.DataFrame) -> str:
    if "locality" in frame:
        return ", ".join(f"{m}: locality {g.locality.mean():.2f} (object {g.object_share.mean():.2f}), transfer cos "
                         f"{g.transfer_cos.mean():.2f}" for m, g in frame.groupby("method", sort=False))
    a1 = frame[frame.alpha == 1.0]
    return f"success@1 {a1.success.mean():.0%} (α=0 {frame[frame.alpha == 0].success.mean():.0%}), preserved {a1.preserved.mean():.0%}"


STUDY = Study(
    name="hspace-edits", help="h-space edits (class means, projection, Asyrp, Jacobian) beside EIM (issue 18)",
    config=HSpaceEditConfig,
    units=lambda cfg: [Unit(m, (("method", method), ("level", lv))) for m in cfg.models for lv in cfg.levels()
                       for method in cfg.methods],
    setup=_setup, compute=_compute, report=_report, axes=("models", "methods", *LEVEL_AXES),
    paper="h-space and Asyrp seeds: supervised, learned and Jacobian directions vs EIM (toy pair)",
    toy_config="hspace-edits-toy.yaml", paper_config="hspace-edits-paper.yaml", figure_files=("hspace-edits.png", "hspace-edits-table.md"), summary_line=_line,
)
run, config_from = STUDY.run, STUDY.config_from
