"""A pipeline's default sampling settings: the low layer that every user of them imports
(``registry.load_pipeline`` sets them; the toy world, the editor and the studies read them)."""

from __future__ import annotations

SETTINGS_FILE = "dit_probe.json"  # a pipeline folder's default sampling settings (the toy models ship one)


def sampling_settings(pipe) -> dict:
    """The default call arguments of a pipeline loaded by ``load_pipeline`` (steps, guidance, size, and
    for SD3 without T5 the text length); {} for a pipeline built elsewhere. Pass them on to ``pipe(...)``."""
    return dict(getattr(pipe, "dit_probe_settings", {}))
