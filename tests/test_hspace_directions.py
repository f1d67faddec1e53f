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


def test_jacobian_subspace_iteration_equals_an_explicit_svd():
    """On a small nonlinear map, where the Jacobian can be written out: singular values and the spanned
    input subspace match numpy's SVD of the explicit Jacobian."""
    from dit_probe.editing.hspace import jacobian_directions

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 12, generator=g), torch.randn(20, 30, generator=g)

    def f(h):
        return b @ torch.tanh(a @ h.flatten())

    h = torch.randn(3, 4, generator=g)
    s, v, u = jacobian_directions(f, h, k=3, iters=60)
    jac = torch.autograd.functional.jacobian(f, h).reshape(20, 12).double()
    _, s_ref, vt_ref = torch.linalg.svd(jac)
    assert torch.allclose(s.double(), s_ref[:3], rtol=1e-4)
    for i in range(3):
        assert abs(float(v[i].flatten().double() @ vt_ref[i])) > 0.999
    assert torch.allclose(u.flatten(1) @ u.flatten(1).T, torch.eye(3), atol=1e-5)


@pytest.mark.parametrize("name, site", [("tiny-sd3", "block.02.image"), ("tiny-sd3.5", "block.01.image"),
                                        ("tiny-flux", "single.00.image"), ("tiny-unet", "mid.out")])
def test_jacobian_of_a_tiny_denoiser_at_a_hidden_site(name, site):
    """The denoiser's eps as a function of a hidden state, on every family: the top singular value from the
    iteration equals the one from the explicit Jacobian (built row by row with reverse-mode products here)."""
    from torch.func import vjp

    from dit_probe import get_adapter
    from dit_probe.editing.hspace import denoiser_jacobian, jacobian_directions
    from dit_probe.tiny import tiny_pipeline

    pipe = tiny_pipeline(name)
    ad = get_adapter(pipe)
    cond = ad.encode_prompt("a red car", do_cfg=False)
    channels = ad.denoiser.config.in_channels // (4 if ad.family == "flux" else 1)  # Flux packs 2 x 2 patches
    z = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(1))  # a small Jacobian
    ad.set_timesteps(10, latents=z)
    f, h0 = denoiser_jacobian(ad, site, z, pipe.scheduler.timesteps[4], cond)
    s, v, _ = jacobian_directions(f, h0, k=4, iters=50)  # a block of 4: the top value converges at (s5 / s1)^iters
    y, pullback = vjp(f, h0)
    m = y.numel()
    rows = [pullback(torch.eye(m)[i].view_as(y))[0].flatten() for i in range(m)]  # row i of J = J^T e_i
    s_ref = torch.linalg.svdvals(torch.stack(rows).double())
    assert torch.allclose(s[0].double(), s_ref[0], rtol=1e-3), (s, s_ref[:3])


def test_eta_squared_and_r_squared_by_hand():
    from dit_probe.studies.hspace import eta_squared, r_squared

    scores = np.array([1.0, 3.0, 5.0, 7.0])
    assert eta_squared(scores, np.array(["a", "a", "b", "b"])) == pytest.approx(16 / 20)  # between 16, total 20
    assert eta_squared(scores, np.array(["a", "b", "a", "b"])) == pytest.approx(4 / 20)
    assert r_squared(scores, np.array([2.0, 4.0, 6.0, 8.0])) == pytest.approx(1.0)


def test_hspace_study_runs_through_the_runner_and_reuses_its_cache(tmp_path):
    from dit_probe.studies import STUDIES

    study = STUDIES["hspace"]
    cfg = study.config_from(models=["toy-unet"], n=24, components=3, bootstrap=20, log_snrs=[-1.5])
    best = study.run(cfg, out=tmp_path / "h", log=lambda *a: None, quiet=True)
    assert set(best.attribute) == {"color", "shape", "size", "background", "x", "y"}
    assert ((best.value >= best.ci_low - 1e-9) & (best.value <= best.ci_high + 1e-9)).all()
    assert (tmp_path / "h" / "table.md").exists()
    first, again = [], []
    study.run(cfg, out=tmp_path / "h2", log=first.append, quiet=True)
    study.run(cfg, out=tmp_path / "h2", log=again.append, quiet=True)
    computed = lambda logs: [m for m in logs if "best eta²/r²" in str(m)]  # noqa: E731 (one line per computed unit)
    assert len(computed(first)) == 2 and computed(again) == []  # full and empty prompt; the rerun reads the cache
    more = []  # the intervals are computed inside each unit: another bootstrap size is another unit
    study.run(cfg.model_copy(update={"bootstrap": 30}), out=tmp_path / "h2", log=more.append, quiet=True)
    assert len(computed(more)) == 2
