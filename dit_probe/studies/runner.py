"""One runner for every study: typed configs, settings-keyed units, atomic outputs, sharding, provenance.

A study is a declaration (``Study``): its config class, how its settings split into units, how one
unit is computed, and how the units become tables and figures. The runner owns everything else:

- **Units keyed by their settings.** A unit's files are named by a hash of exactly the settings that
  produce it: every config field except the study's axes (the lists that enumerate units, e.g.
  ``models``, ``modes``) and its report-only fields (``bootstrap``), plus the unit's own keys, the
  model's identity (the weights' checksums for shipped toy models) and the study's ``revision``.
  A changed setting therefore computes new units and never reuses stale ones; an unrelated change
  (the figure folder, adding a mode) recomputes nothing. Old units stay on disk untouched (delete
  ``<out>/units`` to reclaim the space).
- **Damage is detected.** A unit is complete when its manifest (``.json``, written last) lists the
  SHA-256 of each of its files and they match; a truncated or edited file is named in a warning and
  the unit is recomputed.
- **Atomic writes** for every file (``dit_probe.io``), ``config.json`` and ``run.json`` provenance.
- **Sharding on accelerate**: under ``accelerate launch --num_processes N`` (GPUs) or ``torchrun
  --nproc_per_node N`` (CPUs) the units still to compute are split with
  ``PartialState.split_between_processes``; each process writes its own units and the
  main process writes the tables once all exist. One process or N give identical tables, because the
  report always reads the units back from disk.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import matplotlib.pyplot as plt
import pandas as pd
import torch
import yaml
from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from ..io import atomic_write, read_arrays, settings_hash, sha256, versions, write_arrays, write_csv, write_json, write_text
from ..registry import model_identity
from ..seeds import PURPOSES, check_seed

PAPER_STRENGTH = 0.75  # the paper's editing strength (section 4.2), the default of every editing study


class ConfigError(ValueError):
    """A study's settings cannot be used as given (the message names the key and the file)."""


class StudyConfig(BaseModel):
    """Base of every study's settings: unknown keys and wrong types are refused (pydantic, extra=forbid)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    models: list[str] = ["toy-mmdit", "toy-unet"]
    bootstrap: int = 1000  # bootstrap resamples of every CI
    purpose: str = "development"  # 'evaluation': a reported number, its seed in seeds.EVALUATION (checked)

    REPORT_ONLY: ClassVar[tuple[str, ...]] = ("bootstrap",)  # fields no unit depends on

    def check(self) -> None:
        """Rules across fields, beyond their types; raise ValueError with what to change."""

    def validate_all(self) -> None:
        """``check`` plus the seed rule: an evaluation run uses an evaluation-only seed (``dit_probe.seeds``)."""
        self.check()
        name = next((k for k in ("seed", "first_seed") if k in type(self).model_fields), None)
        if name is not None:
            check_seed(getattr(self, name), self.purpose, name)
        elif self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "settings"
    if e["type"] == "extra_forbidden":
        return f"unknown setting {key!r}"
    got = e.get("input")
    return f"{key}: {e['msg']}" + (f" (got {got!r})" if got is not None else "")


def load_config(cls: type[StudyConfig], path=None, **overrides) -> StudyConfig:
    """Settings from a YAML/JSON file and keyword overrides (None keeps the file's value), validated by
    type and by the study's own rules. Any problem is one ``ConfigError`` naming the key and the file."""
    values, where = {}, "settings"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: malformed YAML{line}: {getattr(err, 'problem', err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings (key: value), got {type(values).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = cls(**{**values, **given})
    except ValidationError as err:
        key = err.errors()[0]["loc"][0] if err.errors()[0]["loc"] else None
        src = "option" if key in given else where
        valid = f"; valid settings: {', '.join(cls.model_fields)}" if err.errors()[0]["type"] == "extra_forbidden" else ""
        raise ConfigError(f"{src}: {_first_error(err)}{valid}") from None
    try:
        cfg.validate_all()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg


@dataclass(frozen=True)
class Unit:
    """One independently computed and cached piece of a study: a model and the keys that pick the rest."""

    model: str
    keys: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:  # a file name: '/' (as in 'hsds-only/omit') and other odd characters become '_'
        return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "--".join(f"{v}" for _, v in self.keys)) or "all"

    def __getitem__(self, key):
        return dict(self.keys)[key]

    def __str__(self):
        return f"{self.model} {self.name}"


@dataclass
class Report:
    result: Any  # what ``run`` returns
    files: dict = field(default_factory=dict)  # name -> DataFrame or text, written into the results folder
    figures: dict = field(default_factory=dict)  # name -> matplotlib figure, DataFrame or text: the figure folder
    text: str = ""  # printed at the end


@dataclass
class UnitResult:
    unit: Unit
    frame: pd.DataFrame
    arrays: dict | None


@dataclass(frozen=True)
class Study:
    """A study, declared once: the CLI, ``dit-probe figures`` and the indexes are made from these fields."""

    name: str
    help: str
    config: type[StudyConfig]
    units: Callable[[StudyConfig], list[Unit]]
    setup: Callable[[StudyConfig, str, Any], Any]  # (cfg, model, shared) -> context, once per model and process
    compute: Callable[[Any, Unit, StudyConfig], tuple[pd.DataFrame, dict | None]]
    report: Callable[[StudyConfig, list[UnitResult], Path], Report]
    axes: tuple[str, ...] = ("models",)  # config fields that enumerate units (not part of a unit's key)
    prepare: Callable[[StudyConfig, Path], Any] | None = None  # shared once per process (image source, data)
    paper: str = ""  # what it regenerates in the paper
    toy_config: str = ""  # experiments/<file> run by ``dit-probe figures``
    paper_config: str = ""  # experiments/<file> with the real models
    figure_files: tuple[str, ...] = ()
    read_csv: dict = field(default_factory=dict)  # pandas options that read a unit back exactly
    summary_line: Callable[[pd.DataFrame], str] | None = None  # logged after each unit
    revision: int = 1  # bump when a unit's computation changes: cached units of older revisions are not reused
    # config fields a unit's result does not depend on (a study with parts: changing one part's settings then
    # recomputes only that part); a field not named here is part of every unit's key
    ignores: Callable[[Unit], set[str]] | None = None

    def config_from(self, path=None, **overrides) -> StudyConfig:
        return load_config(self.config, path, **overrides)

    def run(self, cfg: StudyConfig, out=None, figures=None, log=None, quiet: bool = False):
        return run(self, cfg, out=out, figures=figures, log=log, quiet=quiet)


# ----- units on disk -----
def unit_settings(study: Study, cfg: StudyConfig, unit: Unit) -> dict:
    """Exactly what a unit's result depends on (hashed into its file names)."""
    skip = set(study.axes) | set(cfg.REPORT_ONLY) | {"purpose"}  # purpose labels a run, it computes nothing
    skip |= study.ignores(unit) if study.ignores else set()
    fixed = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    return {"study": study.name, "revision": study.revision, "model": unit.model,
            "model_identity": model_identity(unit.model), "unit": dict(unit.keys), "settings": fixed}


def _folder(model: str) -> str:
    return Path(model).name if Path(model).is_dir() else model.replace("/", "-")


def unit_paths(out: Path, study: Study, cfg: StudyConfig, unit: Unit) -> dict[str, Path]:
    folder = out / "units" / _folder(unit.model)
    stem = f"{unit.name}-{settings_hash(unit_settings(study, cfg, unit))}"  # names may hold dots ("0.15")
    return {kind: folder / f"{stem}.{ext}" for kind, ext in (("manifest", "json"), ("csv", "csv"), ("npz", "npz"))}


def load_unit(study: Study, paths: dict[str, Path], log) -> tuple[pd.DataFrame, dict | None] | None:
    """The unit's frame and arrays if every file is present and matches its manifest; else None (with a
    warning naming the damaged file, which is then recomputed)."""
    manifest = paths["manifest"]
    if not manifest.exists():
        for kind in ("csv", "npz"):
            if paths[kind].exists():
                log(f"warning: {paths[kind]} has no manifest (an interrupted or copied run): recomputing it")
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log(f"warning: {manifest} is damaged: recomputing the unit")
        return None
    for kind, digest in files.items():
        if not paths[kind].exists() or sha256(paths[kind]) != digest:
            log(f"warning: {paths[kind]} is missing or damaged (its checksum differs from {manifest.name}): "
                "recomputing the unit")
            return None
    frame = pd.read_csv(paths["csv"], **study.read_csv)
    return frame, (read_arrays(paths["npz"]) if "npz" in files else None)


def save_unit(paths: dict[str, Path], settings: dict, frame: pd.DataFrame, arrays: dict | None, seconds: float):
    write_csv(paths["csv"], frame)
    files = {"csv": sha256(paths["csv"])}
    if arrays is not None:
        write_arrays(paths["npz"], **arrays)
        files["npz"] = sha256(paths["npz"])
    write_json(paths["manifest"], {**settings, "files": files, "seconds": round(seconds, 2), "pid": os.getpid(),
                                   "host": platform.node()})  # written last: marks the unit complete


# ----- the run -----
def _write_outputs(out: Path, fig_dir: Path, report: Report) -> None:
    for folder, items in ((out, report.files), (fig_dir, report.figures)):
        for name, obj in items.items():
            if isinstance(obj, pd.DataFrame):
                write_csv(folder / name, obj)
            elif isinstance(obj, str):
                write_text(folder / name, obj)
            else:  # a matplotlib figure
                atomic_write(folder / name, lambda tmp, fig=obj: fig.savefig(tmp, dpi=110, format="png"))
                plt.close(obj)


def run(study: Study, cfg: StudyConfig, out=None, figures=None, log=None, quiet: bool = False):
    """Compute the units that are not on disk yet (this process's share of them under accelerate), then,
    on the main process, write the tables and figures. Returns the study's result (None on other processes)."""
    log = log or (lambda *a: None if quiet else tqdm.write(" ".join(map(str, a))))
    cfg = study.config.model_validate(cfg.model_dump())  # re-validated: a config edited in place is checked too
    cfg.validate_all()
    out = Path(out or f"runs/{study.name}")
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: several CPU processes share the units too
    shared = study.prepare(cfg, out) if study.prepare else None
    started = time.time()
    if state.is_main_process:
        write_json(out / "config.json", {"study": study.name, **cfg.model_dump(mode="json")})
    units = study.units(cfg)
    todo = [u for u in units if load_unit(study, unit_paths(out, study, cfg, u), log) is None]
    with state.split_between_processes(todo) as mine:
        context, current = None, None
        for unit in tqdm(mine, desc=study.name, unit="unit", disable=True if quiet else None, leave=False):
            if unit.model != current:
                context, current = None, unit.model  # one model in memory at a time
                context = study.setup(cfg, unit.model, shared)
            t0 = time.time()
            frame, arrays = study.compute(context, unit, cfg)
            if "model" not in frame:
                frame.insert(0, "model", unit.model)
            save_unit(unit_paths(out, study, cfg, unit), unit_settings(study, cfg, unit), frame, arrays, time.time() - t0)
            line = study.summary_line(frame) if study.summary_line else ""
            log(f"{unit}: {line}  ({time.time() - t0:.0f} s)")
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = []
    for unit in units:
        loaded = load_unit(study, unit_paths(out, study, cfg, unit), log)
        if loaded is None:
            raise RuntimeError(f"unit {unit} of {out} is missing after the run: was a process stopped? Run again "
                               "to compute it")
        results.append(UnitResult(unit, *loaded))
    report = study.report(cfg, results, out)
    fig_dir = Path(figures) if figures else out / "figures"
    _write_outputs(out, fig_dir, report)
    write_json(out / "run.json", {"versions": versions(), "seconds": round(time.time() - started, 1),
                                  "units": len(units), "computed": len(todo), "processes": state.num_processes,
                                  "argv": sys.argv})
    if report.text:
        log(report.text)
    log(f"results: {out}  figures: {fig_dir}")
    return report.result
