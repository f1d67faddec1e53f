"""Studies: thin compositions of the instruments. A config in, a tidy table and figures out; each writes
its results atomically and resumes where it stopped (``dit-probe run <study>``)."""

from __future__ import annotations

import importlib

# name -> (module in dit_probe.studies, run function, config loader, what it measures)
STUDIES = {
    "probing": ("probing", "run", "config_from", "colour/object probes on attention maps (Fig. 7)"),
    "toy-edits": ("toy_editing", "run", "config_from", "EIM and its ablations on toy edits, measured by the judge"),
    "semantic-loss": ("semantic_loss", "run", "config_from",
                      "attribute retention vs forward strength with full / omit / empty prompts (Fig. 13)"),
    "alpha-threshold": ("alpha_threshold", "run", "config_from",
                        "target and collateral change vs edit degree alpha, thresholds, projections (Fig. 10)"),
    "sde": ("sde", "run", "config_from", "the SDE disentanglement metric per model and binary attribute (Table 3)"),
    "benchmark": ("benchmark", "run", "config_from",
                  "ZOPIE-style editing benchmark: background PSNR/SSIM/LPIPS, CLIPScore, graded-edit (Table 2)"),
    "hsds-ablation": ("ablations", "run_hsds", "hsds_config_from", "HSDS lambda x step-size grid on edits (Fig. 11)"),
    "sds-guidance": ("ablations", "run_sds", "sds_config_from",
                     "SDS image direction guided by the target phrase vs the source prompt (Fig. 12)"),
}


def study(name: str):
    """(run, config_from) of a study by its command-line name."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    module, run, config, _ = STUDIES[name]
    m = importlib.import_module(f"{__name__}.{module}")
    return getattr(m, run), getattr(m, config)
