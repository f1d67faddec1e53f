"""Files: one atomic writer for everything the package saves, checksums, run provenance.

A result folder is only ever changed by replacing whole files (write a temporary file in the same
folder, then ``os.replace``), so an interrupted run leaves either the old file or the new one, never
half of one. Files get the usual permissions (0644 under the default umask), not mkstemp's 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path

import diffusers
import numpy as np
import sklearn
import torch
import transformers


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then move the file into place; on any error the old file is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def write_csv(path, frame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_arrays(path, **arrays) -> Path:
    """Arrays into one .npz file (example images beside a study's tables)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def read_arrays(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def save_torch(obj, path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def settings_hash(settings: dict) -> str:
    """A short, stable hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _own_version() -> str | None:
    # from the installed distribution, not ``dit_probe.__version__``: io sits below the package's __init__
    try:
        return distribution_version("dit_probe")
    except PackageNotFoundError:  # a source tree that was never installed
        return None


def versions() -> dict:
    """Package versions and machine, recorded next to every result."""
    return {
        "dit_probe": _own_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
