"""The causal half of the localisation study: where is an attribute decided, and do the read-outs agree?

For one attribute (colour, shape or size) of ``n`` toy scenes, each caption is generated from noise and,
from the same noise, again under each intervention; the judge reads the attribute back:
- ``patching`` part: every hidden site (block outputs, the text each layer receives) over a window of
  steps takes its states from the generation of the caption with the attribute changed (the donor);
  share of images that show the donor's value.
- ``layers`` part, per text-reading layer:
  - LocoGen's text swap of contiguous windows of layers (the donor caption's text there, the
    caption's own text everywhere else): share showing the donor's value; the smallest window that
    flips at least half;
  - withholding the attribute's word from the image queries of one layer, of all layers, and of the
    top-K / bottom-K / K random layers ranked by the word's attention contribution (measured on other
    scenes, so the ranking is fixed before these are generated): share no longer showing the prompt's
    value (the plain generation's share is the floor);
  - knocking out each head's text-to-image contribution (zero): share no longer showing it;
  - the attention contribution of the word per layer (on the ranking scenes).
The v1 world's captions have no position word, so position is not an attribute here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..attention.edit import contributions, knock_out, withhold
from ..causal import donor_states, generate, patched_generations, text_swap_generations
from ..stats import group_cis
from ..toyworld import ATTRIBUTES, Judge, scenes
from ..toyworld.judge import at_judge_size

CAUSAL_ATTRIBUTES = ("color", "shape", "size")
WINDOWS = ("all", "early", "late")  # patched steps: all, the first half, the second half
CHUNK = 8  # patched variants per batch


def window_steps(window: str, n: int) -> list[int]:
    return {"all": list(range(n)), "early": list(range(n // 2)), "late": list(range(n // 2, n))}[window]


def pairs(seed: int, attribute: str, n: int, offset: int):
    """``n`` scenes and their donors: the same scene with ``attribute`` changed to another value."""
    items = scenes(n, seed * 1000 + offset)
    rng = np.random.default_rng([seed, CAUSAL_ATTRIBUTES.index(attribute)])
    donors = [type(s)(**{**s.to_dict(), attribute: rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(s, attribute)])})
              for s in items]
    return items, donors


def _uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


class _Trial:
    """One attribute's scenes and donors on one model: generate, judge, and make result rows."""

    def __init__(self, editor, attribute: str, items, donors, seed: int):
        self.editor, self.attribute, self.items, self.donors, self.seed = editor, attribute, items, donors, seed
        self.judge = Judge()
        self.call = dict(num_inference_steps=editor.num_inference_steps, guidance_scale=editor.guidance_scale,
                         output_type="np", **editor._prompt_kwargs)
        self.prompts = [s.caption() for s in items]
        self.donor_prompts = [d.caption() for d in donors]
        self.words = [getattr(s, attribute) for s in items]

    def generate(self):
        return generate(self.editor.pipe, self.prompts, self.seed, **self.call)

    def rows(self, images, **labels) -> list[dict]:
        reads = self.judge.read(at_judge_size(_uint8(images)))
        a = self.attribute
        return [dict(**labels, scene=i, flipped=r[a] == getattr(d, a), lost=r[a] != getattr(s, a))
                for i, (r, s, d) in enumerate(zip(reads, self.items, self.donors))]


def patching_part(editor, cfg, attribute: str) -> pd.DataFrame:
    """Every hidden site and text input, over each window of steps, from the donor's generation."""
    items, donors = pairs(cfg.seed, attribute, cfg.patch_n, 5)
    t = _Trial(editor, attribute, items, donors, cfg.seed)
    ad = editor.adapter
    sites = [h.name for h in [*ad.hidden_sites(), *ad.text_input_sites()]]
    kept = donor_states(editor.pipe, t.donor_prompts, sites, cfg.seed, **t.call)
    rows = t.rows(t.generate(), site="none", window="none")
    variants = [(site, window) for site in sites for window in cfg.windows]
    for i in range(0, len(variants), CHUNK):
        chunk = variants[i:i + CHUNK]
        batches = patched_generations(editor.pipe, t.prompts, t.donor_prompts,
                                      [(s, window_steps(w, len(kept.steps))) for s, w in chunk], seed=cfg.seed,
                                      donor=kept, **t.call)
        for (site, window), images in zip(chunk, batches):
            rows += t.rows(images, site=site, window=window)
    return pd.DataFrame(rows)


def layer_of(text_input: str) -> str:
    """'block.02.text_in' -> 'block.02', the prefix its attention layer's name starts with."""
    return text_input.removesuffix(".text_in")


def layers_part(editor, cfg, attribute: str) -> pd.DataFrame:
    """Text swaps, withholding and head knockout per text-reading layer; contributions on other scenes."""
    ad, pipe = editor.adapter, editor.pipe
    items, donors = pairs(cfg.seed, attribute, cfg.layers_n, 6)
    t = _Trial(editor, attribute, items, donors, cfg.seed)
    layers = [s.name for s in ad.sites(recordable_only=True)]
    texts = [h.name for h in ad.text_input_sites()]
    by_prefix = {layer_of(x): x for x in texts}
    text_for = {n: by_prefix[next(p for p in by_prefix if n.startswith(p + "."))] for n in layers}
    rows = t.rows(t.generate(), kind="plain", variant="none", layers="", k=0)

    # the word's attention contribution, on scenes not evaluated here (the ranking is fixed beforehand)
    rank_items = scenes(cfg.rank_n, cfg.seed * 1000 + 7)
    with contributions(pipe, [s.caption() for s in rank_items], [getattr(s, attribute) for s in rank_items]) as c:
        generate(pipe, [s.caption() for s in rank_items], cfg.seed + 1, **t.call)
    score = {n: c.layer[n].mean(0) for n in layers}  # (rank scenes,)
    rows += [dict(kind="contribution", variant=n, layers=n, k=1, scene=i, value=float(v))
             for n in layers for i, v in enumerate(score[n])]
    ranked = sorted(layers, key=lambda n: float(score[n].mean()), reverse=True)

    # LocoGen text swap: contiguous windows of layers (in forward order) of the chosen widths, and all
    widths = range(1, len(layers) + 1) if cfg.swap_widths is None else sorted({*cfg.swap_widths, len(layers)})
    windows = [layers[a:a + w] for w in widths if w <= len(layers) for a in range(len(layers) - w + 1)]
    donor = donor_states(pipe, t.donor_prompts, texts, cfg.seed, **t.call)
    base = donor_states(pipe, t.prompts, texts, cfg.seed, **t.call)
    for i in range(0, len(windows), CHUNK):
        chunk = windows[i:i + CHUNK]
        batches = text_swap_generations(pipe, t.prompts, t.donor_prompts, [[text_for[n] for n in w] for w in chunk],
                                        seed=cfg.seed, donor=donor, base=base, **t.call)
        for w, images in zip(chunk, batches):
            rows += t.rows(images, kind="swap", variant="+".join(w), layers="+".join(w), k=len(w))

    # withholding the word: each layer, all layers, and top / bottom / random K by contribution
    rng = np.random.default_rng([cfg.seed, 11, CAUSAL_ATTRIBUTES.index(attribute)])
    sets = [(n, [n]) for n in layers] + [("all", layers)]
    for k in cfg.withhold_k:
        if k < len(layers):
            sets += [(f"top-{k}", ranked[:k]), (f"bottom-{k}", ranked[-k:])]
            sets += [(f"random-{k}", sorted(rng.choice(layers, k, replace=False), key=layers.index))
                     for _ in range(cfg.random_draws)]
    for label, chosen in sets:
        with withhold(pipe, t.prompts, t.words, chosen):
            images = t.generate()
        rows += t.rows(images, kind="withhold", variant=label, layers="+".join(chosen), k=len(chosen))

    # knocking out each head's text-to-image contribution
    if attribute in cfg.heads:
        for n in layers:
            for h in range(ad.module(next(s for s in ad.sites() if s.name == n)).heads):
                with knock_out(pipe, {n: [h]}):
                    images = t.generate()
                rows += t.rows(images, kind="knockout", variant=f"{n}/{h}", layers=n, k=1)
    return pd.DataFrame(rows)


# ----- summaries -----
def summarise_patching(rows: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model, attribute, site and window: the share showing the donor's value (95% CI over scenes);
    site 'none' is the unpatched generation (the floor)."""
    return group_cis(rows, ["model", "attribute", "site", "window"], ["flipped"], n_boot, means=["lost"])


def summarise_layers(rows: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model, attribute, kind and variant: the share flipped to the donor's value and the share lost."""
    gen = rows[rows.kind != "contribution"]
    out = group_cis(gen, ["model", "attribute", "kind", "variant"], ["flipped", "lost"], n_boot, first=["layers", "k"])
    contrib = group_cis(rows[rows.kind == "contribution"], ["model", "attribute", "kind", "variant"], ["value"], n_boot,
                        first=["layers", "k"])
    return pd.concat([out, contrib], ignore_index=True)


def smallest_flipping_window(layers: pd.DataFrame, share: float = 0.5) -> pd.DataFrame:
    """Per model and attribute: the narrowest text-swap window whose flip share is at least ``share``
    (ties: the larger share), or none."""
    out = []
    for (model, attribute), g in layers[layers.kind == "swap"].groupby(["model", "attribute"], sort=False):
        ok = g[g.flipped >= share].sort_values(["k", "flipped"], ascending=[True, False])
        out.append(dict(model=model, attribute=attribute, window=ok.variant.iloc[0] if len(ok) else "none",
                        width=int(ok.k.iloc[0]) if len(ok) else 0, flipped=float(ok.flipped.iloc[0]) if len(ok) else np.nan))
    return pd.DataFrame(out)


def agreement(rows: pd.DataFrame, maps: pd.DataFrame | None, n_boot: int) -> pd.DataFrame:
    """Rank agreement (Spearman) between each read-out's layer ranking (the word's attention contribution;
    for colour and shape the AUROC of the word's text-normalised map, read-out 'word-text', which for a
    UNet equals the raw map) and each causal ranking (one-layer
    text swap: share flipped; one-layer withholding: share lost), per model and attribute. 95% CI: scenes
    resampled for the causal side (read-outs fixed). Chance: 0 (an unrelated ranking)."""
    rng = np.random.default_rng(0)
    out = []
    for (model, attribute), g in rows.groupby(["model", "attribute"], sort=False):
        layers = list(dict.fromkeys(g[g.kind == "contribution"].variant))
        readouts = {"contribution": g[g.kind == "contribution"].groupby("variant").value.mean().reindex(layers).to_numpy()}
        if maps is not None and attribute in ("color", "shape"):
            m = maps[(maps.model == model) & (maps.word == attribute) & (maps.readout == "word-text") & (maps.step == "mean")]
            if len(m):
                readouts["map AUROC"] = m.groupby("layer").auroc.mean().reindex(layers).to_numpy()
        causal = {
            "text swap (flipped)": g[(g.kind == "swap") & (g.k == 1)].pivot_table(index="scene", columns="variant", values="flipped"),
            "withhold (lost)": g[(g.kind == "withhold") & g.variant.isin(layers)].pivot_table(
                index="scene", columns="variant", values="lost"),
        }
        for cname, table in causal.items():
            table = table.reindex(columns=layers).astype(float).to_numpy()  # (scene, layer)
            for rname, r in readouts.items():
                rho = _spearman(r, table.mean(0))
                boots = [_spearman(r, table[rng.integers(0, len(table), len(table))].mean(0)) for _ in range(n_boot)]
                boots = np.asarray([b for b in boots if np.isfinite(b)])
                lo, hi = (np.quantile(boots, [0.025, 0.975]) if len(boots) else (np.nan, np.nan))
                out.append(dict(model=model, attribute=attribute, readout=rname, causal=cname, layers=len(layers),
                                spearman=rho, spearman_lo=lo, spearman_hi=hi))
    return pd.DataFrame(out)


def _spearman(a, b) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan  # a constant ranking (e.g. no layer flips anything) has no rank correlation
    return float(spearmanr(a, b).statistic)


# ----- tables -----
def _ci(r, m):
    return f"{r[m]:.2f} [{r[m + '_lo']:.2f}, {r[m + '_hi']:.2f}]"


def patching_table(p: pd.DataFrame) -> str:
    windows = [w for w in dict.fromkeys(p.window) if w != "none"]
    lines = ["Activation patching: share of generations that show the donor caption's value of the attribute when a "
             "hidden site's states (a block's output, or the text a layer receives: `text_in`) come from the donor's "
             "generation (same noise), per window of steps (95% CI over scenes); 'none' = unpatched (the floor).", "",
             "| model | attribute | site | " + " | ".join(windows) + " |", "|---|---|---|" + "---|" * len(windows)]
    for (model, attribute, site), g in p.groupby(["model", "attribute", "site"], sort=False):
        g = g.set_index("window")
        cells = [_ci(g.loc[w], "flipped") if w in g.index else _ci(g.iloc[0], "flipped") if site == "none" else "–"
                 for w in windows]
        lines.append(f"| {model} | {attribute} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def layers_table(s: pd.DataFrame, small: pd.DataFrame, agree: pd.DataFrame) -> str:
    lines = ["Per text-reading layer (95% CIs over scenes). Text swap: share showing the donor's value when the "
             "window's layers read the donor caption's text (LocoGen; single layers and all layers here, every "
             "window in layers-summary.csv). Withhold: share no longer showing the prompt's value when the layers' "
             "image queries cannot see the attribute word; top/bottom/random-K by the word's attention contribution "
             "(measured on other scenes). Knockout: one head's text-to-image contribution zeroed. Floor: the plain "
             "generation ('plain'). Contribution: the word's attention contribution (norm in the residual stream).", ""]
    lines += ["| model | attribute | kind | variant | flipped to donor | lost | contribution |", "|---|---|---|---|---|---|---|"]
    n_layers = s[s.kind == "contribution"].groupby(["model", "attribute"]).size()
    for r in s.to_dict("records"):
        if r["kind"] == "swap" and r["k"] not in (1, n_layers.get((r["model"], r["attribute"]), 0)):
            continue
        contrib = _ci(r, "value") if r["kind"] == "contribution" else ""
        flipped = _ci(r, "flipped") if r["kind"] in ("swap", "plain") else ""
        lost = _ci(r, "lost") if r["kind"] in ("withhold", "knockout", "plain") else ""
        lines.append(f"| {r['model']} | {r['attribute']} | {r['kind']} | {r['variant']} | {flipped} | {lost} | {contrib} |")
    lines += ["", "Smallest text-swap window that flips at least half of the generations:", "",
              "| model | attribute | window | width | flipped |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['attribute']} | {r['window']} | {r['width']} | {r['flipped']:.2f} |"
              for r in small.to_dict("records")]
    lines += ["", "Rank agreement (Spearman) between read-out and causal layer rankings (95% CI: scenes resampled; "
              "chance 0; n/a: a constant ranking):", "",
              "| model | attribute | read-out | causal | layers | Spearman |", "|---|---|---|---|---|---|"]
    for r in agree.to_dict("records"):
        rho = "n/a" if not np.isfinite(r["spearman"]) else (
            f"{r['spearman']:.2f} [{r['spearman_lo']:.2f}, {r['spearman_hi']:.2f}]")
        lines.append(f"| {r['model']} | {r['attribute']} | {r['readout']} | {r['causal']} | {r['layers']} | {rho} |")
    return "\n".join(lines) + "\n"


def figure(s: pd.DataFrame, maps: pd.DataFrame | None):
    """Per attribute (rows) and model (columns), along the layers: one-layer text swap (flipped), one-layer
    withholding (lost), the plain generation's lost share (floor), the word's attention contribution
    (scaled to its maximum) and, for colour and shape, the AUROC of the word's text-normalised map."""
    import matplotlib.pyplot as plt

    models, attributes = list(dict.fromkeys(s.model)), list(dict.fromkeys(s.attribute))
    fig, axes = plt.subplots(len(attributes), len(models), figsize=(4.6 * len(models), 2.9 * len(attributes)),
                             squeeze=False)
    for i, attribute in enumerate(attributes):
        for j, model in enumerate(models):
            ax, g = axes[i, j], s[(s.model == model) & (s.attribute == attribute)]
            contrib = g[g.kind == "contribution"]
            layers = list(contrib.variant)
            x = np.arange(len(layers))
            for kind, label, measure, sel in (("swap", "text swap: donor value", "flipped", g.k == 1),
                                              ("withhold", "withhold word: value lost", "lost", g.variant.isin(layers))):
                sub = g[(g.kind == kind) & sel].set_index("variant").reindex(layers)
                ax.errorbar(x, sub[measure], yerr=np.clip([sub[measure] - sub[measure + "_lo"], sub[measure + "_hi"] - sub[measure]], 0, None),
                            marker="o", ms=3, capsize=2, label=label)
            ax.plot(x, contrib.value / contrib.value.max(), "s--", ms=3, label="attention contribution (scaled)")
            if maps is not None and attribute in ("color", "shape"):
                m = maps[(maps.model == model) & (maps.word == attribute) & (maps.readout == "word-text")]
                if len(m):
                    ax.plot(x, m.set_index("layer").auroc.reindex(layers), "^:", ms=3, label="word map AUROC (text-normalised)")
            floor = g[g.kind == "plain"].lost
            if len(floor):
                ax.axhline(float(floor.iloc[0]), color="gray", lw=0.8, ls=":", label="plain: value lost (floor)")
            ax.set_xticks(x, layers, rotation=60, fontsize=6)
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{model}: {attribute}", fontsize=9)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig
