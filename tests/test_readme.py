"""The README's quickstart code runs as written."""

import re
from pathlib import Path


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README quickstart", "exec"), scope)
    maps = scope["maps"]
    assert maps.words == ["red", "star"] and maps.steps == [0, 24]
    assert scope["red"].shape == (8, 8)
    assert (tmp_path / "outputs/quickstart-maps/maps.safetensors").exists()
    # the probe works on this tiny grid (chance 0.25) and the edit reaches blue
    assert scope["scores"]["accuracy"]["value"] >= 0.6
    assert [r["color"] for r in scope["Judge"]().read(scope["result"].images[0])] == ["red", "blue"]
