"""figures/ holds exactly what `dit-probe figures` makes, and its INDEX.md lists it."""

from pathlib import Path

import pytest

from dit_probe.figures import PICTURES, ENTRIES, command, regenerate, write_index
from dit_probe.studies import STUDIES

FIGURES = Path(__file__).parents[1] / "figures"


def test_every_committed_figure_comes_from_an_entry_and_back():
    made = {f for e in ENTRIES for f in e.files}
    present = {p.name for p in FIGURES.iterdir()} - {"README.md", "INDEX.md"}  # the two hand-written files
    assert present == made, f"not made by any entry: {present - made}; missing: {made - present}"
    index = (FIGURES / "INDEX.md").read_text()
    for e in ENTRIES:
        assert f"`{command(e)}`" in index and all(f"[{f}]({f})" in index for f in e.files)
        if e.name not in PICTURES:
            assert e.name in STUDIES and (FIGURES.parent / "experiments" / e.config).exists()


def test_index_and_unknown_entries(tmp_path):
    path = write_index(tmp_path, {"probing": 300.0})
    assert "| 5.0 |" in path.read_text()
    with pytest.raises(ValueError, match="unknown figure entries \\['nope'\\]"):
        regenerate(figures=tmp_path, runs=tmp_path, only=["nope"])
