"""What every study shares: atomic writes, run provenance, config files.

A study folder is only ever changed by replacing whole files (write to a temporary file in the same
folder, then ``os.replace``), so an interrupted run leaves either the old file or the new one, never
half of one, and a restarted run can trust every file it finds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then move the file into place; on any error the old file is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=str) + "\n"))


def write_csv(path, frame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_arrays(path, **arrays) -> Path:
    """Arrays into one .npz file (example images beside a study's tables)."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def read_arrays(path) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def versions() -> dict:
    """Package versions and machine, recorded next to every result."""
    import diffusers
    import numpy
    import sklearn
    import torch
    import transformers

    from .. import __version__

    return {
        "dit_probe": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "scikit-learn": sklearn.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_config(cls, path=None, **overrides):
    """A config dataclass from a YAML/JSON file, with keyword overrides (None means: keep the file's value).

    Unknown keys are an error naming the valid ones, so a typo cannot silently run the defaults.
    """
    values = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {cls.__name__}; valid settings: {sorted(fields)}")
    return cls(**values)


def save_figures(out, figures=None, images: dict | None = None, texts: dict | None = None, dpi: int = 110) -> Path:
    """Write a study's figures (matplotlib figures by file name, closed after) and text tables into the
    figure folder: ``figures`` when given (the README's: figures/), else ``<out>/figures``. Returns it."""
    import matplotlib.pyplot as plt

    fig_dir = Path(figures) if figures else Path(out) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in (images or {}).items():
        atomic_write(fig_dir / name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=dpi, format="png"))
        plt.close(fig)
    for name, text in (texts or {}).items():
        atomic_write(fig_dir / name, lambda tmp, text=text: Path(tmp).write_text(text))
    return fig_dir
