"""The teaching notebooks execute top to bottom (outputs are not kept in git)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_six_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs cleared"
    # no time limit: a busy machine must not fail the suite (they take 20-45 s idle on 2 cores)
    NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # no progress bars or library warnings in what a reader sees
    noise = [o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.output_type == "stream" and o.get("name") == "stderr"]
    assert not noise, noise[:3]


def test_teaching_notebooks_do_the_method_by_hand_and_end_with_exercises():
    import nbformat

    for path in NOTEBOOKS[1:3]:  # 02 probing, 03 semantic loss
        cells = nbformat.read(path, as_version=4).cells
        text = "\n".join(c.source for c in cells)
        assert "## Exercises" in text and "by hand" in text.lower()
        by_hand = next(i for i, c in enumerate(cells) if "by hand" in c.source.lower())
        study = next(i for i, c in enumerate(cells) if c.cell_type == "code" and ".run(cfg" in c.source)
        assert by_hand < study  # the method first, then the study call
