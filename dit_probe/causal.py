"""Causal localisation by activation patching (issue 24): where in the denoiser is an attribute decided?

Two prompts differ in one word ("a red star ..." / "a blue star ..."). The donor prompt's generation is
run once, keeping hidden sites' states at every step; the prompt's generation, from the same noise, then
runs with a site's states over a window of steps replaced by the kept ones (``intervene``, every CFG
branch). If the image now shows the donor's attribute, what the site carries at those steps decides it.
Both directions are the same call with the prompts swapped (restore into a corrupted run, or corrupt a
clean run). LocoGen's text swap (``text_swap_generations``) is the same mechanism on the text-input
sites: a window of layers reads the other prompt's text, every other layer its own. Many (site, steps) variants run as one batch (``patched_generations``); every image has its
own seeded generator, so its noise is the same in every run and batch.

    images = patched_generation(pipe, ["a red star"], ["a blue star"], "block.02.image", steps=None)
"""

from __future__ import annotations

import torch

from .adapters import get_adapter
from .hidden import intervene, record_states


def _generators(n: int, seed: int) -> list[torch.Generator]:
    """One generator per image (image b: seed * 1000 + b), so an image's noise does not depend on the batch."""
    return [torch.Generator().manual_seed(seed * 1000 + b) for b in range(n)]


def generate(pipe, prompts, seed: int = 0, **call):
    """The plain generation, with the noise the patched ones use."""
    with torch.no_grad():
        return pipe(list(prompts), generator=_generators(len(prompts), seed), **call).images


def donor_states(pipe, donor_prompts, sites, seed: int = 0, **call):
    """The states of ``sites`` at every step of the generation of ``donor_prompts`` (every CFG row kept),
    for ``patched_generations``; one run serves every site and step window."""
    with torch.no_grad(), record_states(pipe, list(sites), branch="both", tokens="keep") as kept:
        pipe(list(donor_prompts), generator=_generators(len(donor_prompts), seed), **call)
    return kept


def patched_generations(pipe, prompts, donor_prompts, variants, seed: int = 0, donor=None, **call) -> list:
    """For each variant (site, steps) (steps: scheduler indices, None: all), the generation of ``prompts``
    with that site's states at those steps taken from the generation of ``donor_prompts`` from the same
    noise. All variants run as one batch (variant v holds rows v * B .. v * B + B - 1 of each CFG branch).
    ``donor``: the donor generation's states (``donor_states``; else run here). ``call``: the pipeline's
    other arguments. Returns one image batch per variant."""
    prompts, variants = list(prompts), list(variants)
    _check_pairs(prompts, donor_prompts)
    if not variants:
        raise ValueError("give at least one (site, steps) variant")
    kept = donor if donor is not None else donor_states(pipe, donor_prompts, {s for s, _ in variants}, seed, **call)
    return _run_variants(pipe, prompts, [{site: (kept, steps)} for site, steps in variants], seed, call)


def text_swap_generations(pipe, prompts, donor_prompts, windows, steps=None, seed: int = 0, donor=None, base=None,
                          **call) -> list:
    """LocoGen's text swap: for each window (a list of text-input sites, ``adapter.text_input_sites()``),
    the generation of ``prompts`` in which the window's layers receive the text they receive in the
    generation of ``donor_prompts`` and every other text-reading layer the text of the plain generation of
    ``prompts`` (same noise), at ``steps`` (None: all). A UNet's layers all receive the text encoder's
    output, so this is LocoGen's swap exactly; in a joint-attention model the text stream entering each
    block is taken from the two runs, so the swap cannot travel to later blocks through the text stream.
    ``donor`` / ``base``: the two runs' text-input states (``donor_states``; else run here). One batch."""
    prompts, windows = list(prompts), [list(w) for w in windows]
    _check_pairs(prompts, donor_prompts)
    sites = [h.name for h in get_adapter(pipe).text_input_sites()]
    unknown = sorted({s for w in windows for s in w} - set(sites))
    if unknown or not windows:
        raise ValueError(f"windows must be lists of text-input sites; unknown {unknown}; sites: {sites}")
    donor = donor if donor is not None else donor_states(pipe, donor_prompts, sites, seed, **call)
    base = base if base is not None else donor_states(pipe, prompts, sites, seed, **call)
    variants = [{s: (donor if s in w else base, steps) for s in sites} for w in windows]
    return _run_variants(pipe, prompts, variants, seed, call)


def _check_pairs(prompts, donor_prompts) -> None:
    if len(prompts) != len(donor_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(donor_prompts)} donor prompts: one donor per prompt")


def _run_variants(pipe, prompts: list, variants: list[dict], seed: int, call: dict) -> list:
    """Generate ``prompts`` once per variant, in one batch; variant k maps sites to (kept states, steps):
    at those steps the site's state of variant k's rows is the kept run's (every CFG branch)."""
    n, v = len(prompts), len(variants)

    def edit_for(site):
        mine = [(k, kept, None if steps is None else list(steps))
                for k, variant in enumerate(variants) for s, (kept, steps) in variant.items() if s == site]

        def patch(h, where):
            out = h.clone()
            branches = h.shape[0] // (n * v)
            total = len(pipe.scheduler.timesteps)
            for k, kept, steps in mine:
                if steps is not None and where.step not in {s % total for s in steps}:
                    continue
                state = kept[site][kept.steps.index(where.step)].to(h.device, h.dtype)  # (branches * n, ...)
                for br in range(branches):
                    out[br * n * v + k * n: br * n * v + (k + 1) * n] = state[br * n:(br + 1) * n]
            return out
        return patch

    sites = list(dict.fromkeys(s for variant in variants for s in variant))
    with torch.no_grad(), intervene(pipe, {site: edit_for(site) for site in sites}, branch="both"):
        images = pipe(prompts * v, generator=[g for _ in range(v) for g in _generators(n, seed)], **call).images
    return [images[k * n:(k + 1) * n] for k in range(v)]


def patched_generation(pipe, prompts, donor_prompts, site: str, steps=None, seed: int = 0, donor=None, **call):
    """One variant of ``patched_generations``: ``prompts`` generated with ``site``'s states at ``steps``
    from the generation of ``donor_prompts``."""
    return patched_generations(pipe, prompts, donor_prompts, [(site, steps)], seed, donor, **call)[0]
