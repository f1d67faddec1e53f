"""h-space directions: PCA and class means against plain numpy, and Manipulate applying them."""

import numpy as np
import pytest
import torch

from dit_probe.editing import EIMEditor
from dit_probe.editing.directions import EditDirection
from dit_probe.editing.hspace import class_mean_direction, hidden_direction, pca_directions
from dit_probe.hidden import record_states
from dit_probe.registry import load_pipeline
from dit_probe.toyworld import Scene, render


def test_pca_finds_the_axes_an_svd_finds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.array([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    x = x @ np.linalg.qr(rng.normal(size=(6, 6)))[0].T  # rotated
    comps, ratio = pca_directions(torch.tensor(x), k=2, batch_size=50)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    for i in range(2):
        assert abs(float(np.dot(comps[i].numpy(), vt[i]))) > 0.99
    assert np.allclose(ratio, (s**2 / (s**2).sum())[:2], atol=0.02)
    with pytest.raises(ValueError, match="needs more than 8 samples"):
        pca_directions(torch.zeros(5, 3))


def test_class_mean_direction_and_projection():
    x = torch.tensor([[1.0, 0, 2], [3, 0, 2], [0, 1, 0], [0, 3, 0]])
    labels = ["red", "red", "blue", "blue"]
    d = class_mean_direction(x, labels, "red", "blue")
    assert torch.allclose(d, torch.tensor([2.0, -2.0, 2.0]))
    without = class_mean_direction(x, labels, "red", "blue", remove=torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(without, torch.tensor([2.0, -2.0, 0.0]))
    with pytest.raises(ValueError, match="no state is labelled 'green'"):
        class_mean_direction(x, labels, "green", "blue")


def test_manipulate_adds_alpha_times_delta_in_h_space(tmp_path):
    pipe = load_pipeline("toy-unet")
    editor = EIMEditor(pipe, strength=0.6)
    image = render(Scene("star", "red", "large", "white", 16, 16))
    enc = editor.encode([image], ["a large red star on a white background"], seeds=[9_000_500])
    with record_states(pipe, ["mid.out"], tokens="keep") as states:
        editor.reconstruct(enc)
    state_shape = states["mid.out"].shape[2:]  # (C, h, w)
    delta = torch.randn(state_shape[0], generator=torch.Generator().manual_seed(0))
    direction = hidden_direction("mid.out", delta * 3, state_shape)
    zero = hidden_direction("mid.out", delta * 0, state_shape)
    edited = editor.manipulate(enc, direction, [0.0, 1.0])
    plain = editor.manipulate(enc, zero, [0.0, 1.0])
    assert np.array_equal(edited[:, 0], plain[:, 0])  # alpha 0: the plain reconstruction, bit for bit
    assert np.abs(edited[:, 1].astype(int) - plain[:, 1].astype(int)).max() > 10  # alpha 1 moved the image
    back = EditDirection.load(direction.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.hidden["mid.out"], direction.hidden["mid.out"]) and back.sides == ["hidden"]


def test_hidden_edit_rows_map_to_image_and_alpha_under_cfg():
    """Manipulate's rows are image b at alphas[a] (row b*A + a); a CFG call stacks the chunk twice."""
    from dit_probe.hidden import Call

    deltas = torch.tensor([[1.0], [10.0]])  # image 0, image 1 (one channel)
    direction = EditDirection(hidden={"s": deltas})
    alphas = torch.tensor([0.0, 1.0, 2.0])
    edit = direction.hidden_edits(alphas, first_row=2, rows=4)["s"]  # rows 2..5 of B*A = 6: (0,2) (1,0) (1,1) (1,2)
    got = edit(torch.zeros(8, 1), Call(step=0, timestep=1.0, rows=list(range(8))))
    expected = torch.tensor([2.0, 0.0, 10.0, 20.0] * 2).view(8, 1)
    assert torch.equal(got, expected)
