"""Noise levels: where the editing studies and SDE start denoising, as nominal strengths or as log-SNRs.

Two models at one nominal strength sit at different noise levels (the toy pair at the paper's 0.75:
toy-mmdit at log-SNR -4.4, toy-unet at -3.0), so a difference between them there may be a noise-level
artifact. A study therefore takes a list of levels: ``strengths`` (nominal, as the paper) and
``log_snrs`` (targets: each model starts at the strength whose first timestep's log-SNR on its own
schedule is nearest, ``adapter.strength_for_log_snr``). Each level is one unit per model; its rows
carry the level, the strength used and the log-SNR reached, so tables and figures put both models on
one log-SNR axis and still show the paper's strength as a point.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt

from .runner import PAPER_STRENGTH, StudyConfig

LEVEL_AXES = ("strengths", "log_snrs")  # config fields that enumerate units (not part of a unit's hash)


class LevelSettings(StudyConfig):
    strengths: list[float] = [PAPER_STRENGTH]  # nominal forward strengths (fractions of the schedule)
    log_snrs: list[float] = []  # target log-SNRs, matched per model on its own schedule

    def levels(self) -> list[str]:
        return [f"strength={s:g}" for s in self.strengths] + [f"log_snr={v:g}" for v in self.log_snrs]

    def check(self) -> None:
        if not self.strengths and not self.log_snrs:
            raise ValueError("give at least one noise level: strengths (e.g. [0.75]) or log_snrs (e.g. [-3.0])")
        bad = [s for s in self.strengths if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"strengths {bad} are outside (0, 1]: a strength is the forward timestep as a fraction "
                             "of the schedule (the paper edits at 0.75)")
        bad = [v for v in self.log_snrs if not math.isfinite(v)]
        if bad:
            raise ValueError(f"log_snrs {bad} must be finite numbers (e.g. -3.0; lower is noisier)")


def parse_level(level: str) -> tuple[str, float]:
    kind, _, value = level.partition("=")
    return kind, float(value)


def _start(editor, strength: float):
    return editor.adapter.set_timesteps(editor.num_inference_steps, strength)[0]


def apply_level(editor, level: str) -> dict:
    """Set ``editor.strength`` for ``level`` ('strength=0.75' or 'log_snr=-3'); returns the columns every
    row of the unit carries: level, target_log_snr (NaN for a nominal strength), strength, the log-SNR
    reached, and ``paper_start`` (the unit starts where the paper's strength 0.75 starts on this model)."""
    kind, value = parse_level(level)
    if kind == "log_snr":
        editor.strength, _ = editor.adapter.strength_for_log_snr(value, editor.num_inference_steps)
    elif kind == "strength":
        editor.strength = value
    else:
        raise ValueError(f"unknown noise level {level!r}: 'strength=S' or 'log_snr=L'")
    t = _start(editor, editor.strength)
    return {"level": level, "target_log_snr": value if kind == "log_snr" else math.nan, "strength": editor.strength,
            "log_snr": float(editor.adapter.log_snr(t)), "paper_start": bool(t == _start(editor, PAPER_STRENGTH))}


LEVEL_COLUMNS = ["level", "target_log_snr", "strength", "log_snr", "paper_start"]


def with_level(frame, level: dict):
    """``frame`` with the unit's level columns (from ``apply_level``) in front."""
    for k, v in reversed(list(level.items())):
        frame.insert(0, k, v)
    return frame


def plot_against_log_snr(summary, y: str, facet: str, hue: str, ylabel: str, title: str = ""):
    """One panel per ``facet`` value: ``y`` (with its _lo/_hi CI band) against the log-SNR reached, one colour
    per ``hue`` value, one line style per model, so models at matched noise share the x axis; a star marks
    the paper's strength 0.75."""
    facets, hues, models = (list(dict.fromkeys(summary[c])) for c in (facet, hue, "model"))
    fig, axes = plt.subplots(1, len(facets), figsize=(3.6 * len(facets), 3.4), squeeze=False, sharey=True)
    for j, f in enumerate(facets):
        ax = axes[0, j]
        for k, h in enumerate(hues):
            for m, model in enumerate(models):
                g = summary[(summary[facet] == f) & (summary[hue] == h) & (summary.model == model)].sort_values("log_snr")
                if g.empty:
                    continue
                ax.plot(g.log_snr, g[y], color=f"C{k}", ls=("-", "--", ":", "-.")[m % 4], marker="o", ms=3,
                        label=f"{h} ({model})" if j == 0 else None)
                if f"{y}_lo" in g:
                    ax.fill_between(g.log_snr, g[f"{y}_lo"], g[f"{y}_hi"], color=f"C{k}", alpha=0.08)
                p = g[g.paper_start.astype(bool)]
                ax.scatter(p.log_snr, p[y], marker="*", s=80, color=f"C{k}", zorder=4)
        ax.set_title(str(f), fontsize=9)
        ax.set_xlabel("log-SNR at the start (noisier to the left)")
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=6, ncol=1)
    fig.suptitle(title or f"{ylabel} against log-SNR; solid/dashed = models; star = strength 0.75", fontsize=9)
    fig.tight_layout()
    return fig
