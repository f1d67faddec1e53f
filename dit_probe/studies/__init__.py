"""Studies: thin declarations of what to measure, run by one runner (``studies.runner``). A config in,
tidy tables and figures out (``dit-probe run <study>``); ``STUDIES`` is the one registry that the
command line, ``dit-probe figures`` and the indexes are made from."""

from __future__ import annotations

from . import ablations, alpha_threshold, benchmark, hspace, hspace_edits, localisation, probing, sde, semantic_loss, toy_editing
from .runner import ConfigError, Study, StudyConfig

STUDIES: dict[str, Study] = {s.name: s for s in (
    probing.STUDY, semantic_loss.STUDY, alpha_threshold.STUDY, sde.STUDY, toy_editing.STUDY, benchmark.STUDY,
    ablations.HSDS_STUDY, ablations.SDS_STUDY, ablations.CONVENTIONS_STUDY, hspace.STUDY,
    hspace_edits.STUDY, localisation.STUDY)}


def study(name: str) -> Study:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


__all__ = ["STUDIES", "ConfigError", "Study", "StudyConfig", "study"]
