"""Noise levels (studies.levels) and the seed rule (dit_probe.seeds): models compared at matched log-SNR,
and reported numbers only from evaluation-only seeds."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from dit_probe.editing import EIMEditor
from dit_probe.registry import load_pipeline
from dit_probe.seeds import EVALUATION, check_seed
from dit_probe.studies import STUDIES
from dit_probe.studies.levels import apply_level
from dit_probe.studies.runner import ConfigError

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


@pytest.fixture(scope="module")
def editors():
    return {m: EIMEditor(load_pipeline(m)) for m in ("toy-mmdit", "toy-unet")}


@pytest.mark.parametrize("model", ["toy-mmdit", "toy-unet"])
def test_every_start_of_the_schedule_is_reachable(editors, model):
    """25 steps give 24 starts below pure noise; k/n alone misses one on the flow schedule (25 * 0.56 rounds
    down), which the nudged strengths recover."""
    ad = editors[model].adapter
    levels = ad.noise_levels(25)
    assert len(levels) == 24
    steps = [len(ad.set_timesteps(25, s)) for s, _ in levels]
    assert steps == list(range(1, 25))
    log_snrs = [v for _, v in levels]
    assert all(a > b for a, b in zip(log_snrs, log_snrs[1:]))  # more steps, more noise


@pytest.mark.parametrize("model", ["toy-mmdit", "toy-unet"])
@pytest.mark.parametrize("target", [-6.0, -4.4, -3.0, -1.5, 0.0])
def test_a_log_snr_target_starts_at_the_nearest_level(editors, model, target):
    ed = editors[model]
    row = apply_level(ed, f"log_snr={target:g}")
    gaps = [abs(v - target) for _, v in ed.adapter.noise_levels(ed.num_inference_steps)]
    assert abs(row["log_snr"] - target) == pytest.approx(min(gaps))
    assert abs(row["log_snr"] - target) < 0.35  # the toy schedules' starts are at most 0.7 log-SNR apart here
    assert ed.strength == row["strength"]
    enc = ed.encode(np.zeros((1, 32, 32, 3), np.uint8), ["a red circle"], 0)
    assert float(ed.adapter.log_snr(enc.t)) == pytest.approx(row["log_snr"])  # the editor starts there


def test_one_strength_is_two_noise_levels_and_the_paper_point_is_marked(editors):
    """At the paper's 0.75 the toy pair starts at different log-SNRs (-4.4 and -3.0); each model's own
    paper start is marked where a log-SNR target lands on it."""
    at = {m: apply_level(ed, "strength=0.75") for m, ed in editors.items()}
    assert at["toy-mmdit"]["log_snr"] == pytest.approx(-4.40, abs=0.01)
    assert at["toy-unet"]["log_snr"] == pytest.approx(-3.04, abs=0.01)
    assert apply_level(editors["toy-mmdit"], "log_snr=-4.4")["paper_start"]
    assert not apply_level(editors["toy-mmdit"], "log_snr=-3")["paper_start"]
    assert apply_level(editors["toy-unet"], "log_snr=-3")["paper_start"]
    with pytest.raises(ValueError, match="unknown noise level"):
        apply_level(editors["toy-unet"], "sigma=0.5")


def test_the_seed_rule():
    check_seed(EVALUATION.start, "evaluation")
    check_seed(0, "development")
    with pytest.raises(ValueError, match="needs seed in the evaluation range"):
        check_seed(1000, "evaluation")
    with pytest.raises(ValueError, match="evaluation-only range"):
        check_seed(EVALUATION.start + 5, "development")
    with pytest.raises(ConfigError, match="purpose 'evaluation' needs seed"):
        STUDIES["sde"].config_from(None, purpose="evaluation", seed=3)
    with pytest.raises(ConfigError, match="purpose must be one of"):
        STUDIES["toy-edits"].config_from(None, purpose="final")


def test_every_figure_config_is_an_evaluation_run_on_its_own_seed():
    """What `dit-probe figures` reports comes from evaluation-only seeds, one per study."""
    seeds = {}
    for study in STUDIES.values():
        if not study.toy_config:
            continue
        raw = yaml.safe_load((EXPERIMENTS / study.toy_config).read_text())
        assert raw.get("purpose") == "evaluation", study.toy_config
        cfg = study.config_from(EXPERIMENTS / study.toy_config)  # the seed rule is checked on load
        seeds.setdefault(getattr(cfg, "seed", getattr(cfg, "first_seed", None)), []).append(study.name)
    shared = {s: names for s, names in seeds.items() if len(names) > 1}
    assert not shared, shared  # independent samples for independent findings
