"""The graded-edit score: the stand-in for the paper's MLLM-VQA column (Table 2).

The paper shows GPT-4 the images of consecutive editing degrees and asks whether the second reflects
a gradual change of the edit feature compared to the first; the score is the share of "yes". Here a
judge answers instead: for each pair of consecutive alphas, "yes" when the judge's probability of the
target (toy judge: the target attribute value; CLIP: the edit prompt against the source prompt) rises
by more than ``delta``. Reported as a percentage over all pairs of all edits.
"""

from __future__ import annotations

import numpy as np


def graded_steps(scores, alphas, delta: float = 0.02) -> np.ndarray:
    """(edits, alphas) judge scores -> (edits, alphas - 1) booleans: does each next alpha raise the score
    by more than ``delta``? Alphas are sorted first, so the pairs are consecutive degrees."""
    s = np.atleast_2d(np.asarray(scores, float))
    a = np.asarray(alphas, float)
    if s.shape[1] != len(a) or len(a) < 2:
        raise ValueError(f"need scores shaped (edits, {len(a)}) for {len(a)} alphas (at least 2), got {s.shape}")
    order = np.argsort(a)
    return np.diff(s[:, order], axis=1) > delta


def graded_edit_score(scores, alphas, delta: float = 0.02) -> float:
    """Percentage of consecutive-alpha pairs in which the target score rises by more than ``delta``."""
    return float(100 * graded_steps(scores, alphas, delta).mean())
