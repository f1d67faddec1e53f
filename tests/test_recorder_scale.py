"""The recorder at scale: storage dtype, float32 accumulation in half-precision models, the memory
estimate and budget, which path computed each layer, and the CUDA kernel path (where CUDA exists)."""

import pytest
import torch

from dit_probe import get_adapter, record
from dit_probe.architectures import random_text_inputs, real_pipeline
from dit_probe.attention import Recorder, RecordingTooLarge, estimate_recording
from dit_probe.attention.maps import AttentionMaps

from .conftest import FAMILIES, generate
from .reference import InputCapture, reference_probs

PROMPTS = ["a red car on a blue background", "a small red car"]


def _held_bytes(maps) -> int:
    maps._build()
    return sum(t.nbytes for t in list(maps._data.values()) + list(maps._mass.values()) if t is not None)


OPTIONS = [
    dict(),
    dict(heads="keep", branch="both", dtype=torch.float16),
    dict(steps=[0, 2], text_mass=False, dtype=torch.bfloat16),
    dict(mean_over_steps=True, tokens=[1, 4], layers=[0, -1]),
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("options", OPTIONS, ids=["default", "keep-both-fp16", "steps-nomass-bf16", "mean-tokens-layers"])
def test_estimate_is_what_the_recording_holds(pipes, name, options):
    """At a non-square size (48x40 px). The tiny UNet's levels never round (its pipeline takes multiples of
    8 and halves once); rounding up is checked on the true-size SD2.1 UNet in test_architectures.py."""
    pipe = pipes(name)
    rec = Recorder(pipe, words=["red", "car"], **options)
    with rec as maps:
        generate(pipe, PROMPTS, steps=3, height=48, width=40)
    est = estimate_recording(pipe, 48, 40, 3, batch=2, words=["red", "car"], **options)
    assert est.total == _held_bytes(maps) > 0
    ad = get_adapter(pipe)
    assert maps.grids == {s.name: ad.layer_grid(s, ad.token_grid(48, 40)) for s in rec.sites}


def test_storage_dtype_is_the_float32_mean_rounded_once(pipes):
    pipe = pipes("tiny-sd3")
    got = {}
    for dtype in (torch.float32, torch.float16):
        with record(pipe, words=["red"], heads="keep", dtype=dtype, text_mass=True) as maps:
            generate(pipe, PROMPTS, steps=2)
        got[dtype] = maps
    full, half = got[torch.float32], got[torch.float16]
    full._build(), half._build()
    for layer in full.layers:
        assert half._data[layer].dtype == torch.float16
        assert torch.equal(half._data[layer], full._data[layer].half())
    assert _held_bytes(half) * 2 == _held_bytes(full)
    t = half.tensor("red", normalise="text")
    assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_saved_maps_keep_dtype_and_paths(pipes, tmp_path):
    pipe = pipes("tiny-flux")
    with record(pipe, words=["red"], dtype=torch.bfloat16) as maps:
        generate(pipe, PROMPTS, steps=2)
    back = AttentionMaps.load(maps.save(tmp_path / "m"))
    assert back.paths == maps.paths and set(back.paths) == set(maps.layers)
    assert all(back._data[k].dtype == torch.bfloat16 for k in back.layers)
    assert torch.equal(back.tensor("red"), maps.tensor("red"))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_layer_takes_the_kernel_path_on_cpu(pipes, name):
    """No silent slow path: with the default method, every recorded call of every family takes the
    row log-sum-exp from the attention kernel (Flux passes enable_gqa=False, which must not matter)."""
    pipe = pipes(name)
    with record(pipe, words=["red"], branch="both") as maps:
        generate(pipe, PROMPTS, steps=2)
    assert set(maps.paths) == set(maps.layers)
    # PixArt masks its padded text keys: a masked call takes the chunked path by design (the kernel path's
    # log-sum-exp has no mask); every other family's calls are unmasked
    expected = {"chunked"} if name == "tiny-pixart" else {"kernel"}
    assert all(set(p) == expected for p in maps.paths.values()), maps.paths
    with record(pipe, words=["red"], method="chunked") as chunked:
        generate(pipe, PROMPTS, steps=2)
    assert all(set(p) == {"chunked"} for p in chunked.paths.values())
    assert (chunked.tensor("red") - maps.tensor("red", branch="cond")).abs().max() < 1e-6


def test_budget_refuses_a_generation_before_it_runs_and_keeps_earlier_ones(pipes):
    pipe = pipes("tiny-unet")
    one = estimate_recording(pipe, 32, 32, 3, batch=2, words=["red"]).total
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(RecordingTooLarge, match=r"over max_bytes=.*mean_over_steps=True"):
            with record(pipe, words=["red"], max_bytes=one - 1):
                generate(pipe, PROMPTS, steps=3)
        assert calls == [1]  # refused at its first denoiser call, before any attention ran
        with pytest.raises(RecordingTooLarge, match="before it"):
            with record(pipe, words=["red"], max_bytes=one + one // 2) as maps:
                generate(pipe, PROMPTS, steps=3)
                generate(pipe, PROMPTS, steps=3)
    finally:
        hook.remove()
    assert maps.batch_size == 2 and maps.steps == [0, 1, 2]  # the first generation is kept whole


def test_bf16_model_maps_match_a_float64_reference():
    """A true-width SD3-medium block in bfloat16 (no qk-norm, so the reference's q and k are bitwise the
    model's): per-step maps, and their mean over 6 steps summed as it goes, within 1e-4 (relative) of a
    float64 softmax of the same q and k. Computing or summing in bfloat16 is off by about 1e-2."""
    pipe = real_pipeline("sd3-medium", dtype=torch.bfloat16, layers=1)
    ad = get_adapter(pipe)
    site = ad.sites(recordable_only=True)[0]
    text = random_text_inputs("sd3-medium", seed=2, dtype=torch.bfloat16)
    cols = [3, 70, 100]
    def run():
        pipe(**text, height=128, width=128, num_inference_steps=6, guidance_scale=4.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))

    cap = InputCapture(ad.denoiser, [site.path])
    try:
        with record(pipe, tokens=cols) as per_step:
            run()
    finally:
        cap.close()
    with record(pipe, tokens=cols, mean_over_steps=True) as mean:
        run()
    refs = []
    for args, kwargs, tl in cap.calls[site.path]:
        p = reference_probs("sd3", ad.module(site), args, kwargs, tl, dtype=torch.float64)[..., cols]
        refs.append(p.chunk(2)[1].mean(1).transpose(-1, -2))  # cond rows, heads averaged: (batch, token, n)
    ref = torch.stack(refs)
    got = per_step.tensor(branch="cond")[:, 0, 0, :, 0].flatten(-2).double()  # (step, batch, token, n)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() < 1e-4 * scale
    got_mean = mean.tensor(branch="cond")[0, 0, 0, :, 0].flatten(-2).double()
    assert (got_mean - ref.mean(0)).abs().max().item() < 1e-4 * scale
    assert (got[0] - ref[0]).abs().max().item() > 0  # the test compares different computations


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the recorder's GPU kernel path")


@cuda
@pytest.mark.parametrize("backend", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_kernel_path_is_bitwise_and_exact(pipes, name, backend):
    """On CUDA in bfloat16, with SDPA held to one backend: images bitwise equal with and without the
    recorder; flash and memory-efficient calls take the kernel's own log-sum-exp, cuDNN calls a second
    kernel's ('kernel-rerun');
    maps within 1e-4 (relative) of a float64 reference of the same q and k."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = pipes(name).to("cuda", torch.bfloat16)
    try:
        ad = get_adapter(pipe)
        sites = ad.sites(recordable_only=True)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            plain = generate(pipe, PROMPTS, steps=2)
            cap = InputCapture(ad.denoiser, [s.path for s in sites])
            try:
                with record(pipe, tokens=[0, 1, 3]) as maps:
                    recorded = generate(pipe, PROMPTS, steps=2)
            finally:
                cap.close()
        assert torch.equal(plain, recorded)
        want = "kernel-rerun" if backend == "CUDNN_ATTENTION" else "kernel"
        assert all(set(p) == {want} for p in maps.paths.values()), maps.paths
        site = sites[0]
        args, kwargs, tl = cap.calls[site.path][0]
        kind = {"unet": "cross", "flux": "flux-double"}.get(ad.family, "sd3")
        ref = reference_probs(kind, ad.module(site), args, kwargs, tl, dtype=torch.float64)[..., [0, 1, 3]]
        ref = (ref.chunk(2)[1] if ad.family != "flux" else ref).mean(1).transpose(-1, -2).cpu()
        got = maps.tensor(layer=site.name, step=0)[0, 0, 0, :, 0].flatten(-2).double()
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    finally:
        pipe.to("cpu", torch.float32)
