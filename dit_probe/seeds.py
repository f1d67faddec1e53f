"""Which seeds may be used for what: the project's one declaration of its seed ranges.

Every number in the README and docs comes from a run whose config says ``purpose: evaluation`` and whose
seed lies in ``EVALUATION``; nothing was tuned, trained or chosen on a seed in that range. Development
runs (choosing settings, debugging, the toy models' training) use seeds outside it:

- training: scene seeds 0 .. n_images - 1, VAE and judge renders from 10_000_000 on, the toy attribute
  classifier's renders from 20_000_000 on;
- development: every seed below 9_000_000 (the toy model cards before issue 16 used 1_000_000, the
  editing studies 0-1000 while their settings were chosen).

A study derives its per-sample seeds from its config seed by an affine map whose multiplier exceeds the
offsets it adds (e.g. ``seed * 100_000 + i`` with ``i < 100_000``), so samples of an evaluation seed never
coincide with those of a development seed.
"""

from __future__ import annotations

EVALUATION = range(9_000_000, 10_000_000)
PURPOSES = ("development", "evaluation")


def check_seed(seed: int, purpose: str, name: str = "seed") -> None:
    """Refuse an evaluation run on a development seed, and a development run on an evaluation seed."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    inside = seed in EVALUATION
    if purpose == "evaluation" and not inside:
        raise ValueError(f"purpose 'evaluation' needs {name} in the evaluation range [{EVALUATION.start:_}, "
                         f"{EVALUATION.stop:_}) (no setting was chosen on those seeds); got {seed}")
    if purpose == "development" and inside:
        raise ValueError(f"{name} {seed} is in the evaluation-only range [{EVALUATION.start:_}, {EVALUATION.stop:_}): "
                         "choose settings on another seed, or declare purpose: evaluation")
