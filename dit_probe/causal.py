"""Causal localisation by activation patching (issue 24): where in the denoiser is an attribute decided?

Two prompts differ in one word ("a red star ..." / "a blue star ..."). The donor prompt's generation is
run once, keeping hidden sites' states at every step; the prompt's generation, from the same noise, then
runs with a site's states over a window of steps replaced by the kept ones (``intervene``, every CFG
branch). If the image now shows the donor's attribute, what the site carries at those steps decides it.
Both directions are the same call with the prompts swapped (restore into a corrupted run, or corrupt a
clean run). Many (site, steps) variants run as one batch (``patched_generations``); every image has its
own seeded generator, so its noise is the same in every run and batch.

    images = patched_generation(pipe, ["a red star"], ["a blue star"], "block.02.image", steps=None)
"""

from __future__ import annotations

import torch

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
    if len(prompts) != len(donor_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(donor_prompts)} donor prompts: one donor per prompt")
    if not variants:
        raise ValueError("give at least one (site, steps) variant")
    n, v = len(prompts), len(variants)
    kept = donor if donor is not None else donor_states(pipe, donor_prompts, {s for s, _ in variants}, seed, **call)
    index = {s: k for k, s in enumerate(kept.steps)}

    def edit_for(site):
        mine = [(k, None if steps is None else list(steps)) for k, (s, steps) in enumerate(variants) if s == site]

        def patch(h, where):
            out = h.clone()
            branches = h.shape[0] // (n * v)
            state = kept[site][index[where.step]].to(h.device, h.dtype)  # (branches * n, ...)
            count = len(pipe.scheduler.timesteps)
            for k, steps in mine:
                if steps is not None and where.step not in {s % count for s in steps}:
                    continue
                for br in range(branches):
                    out[br * n * v + k * n: br * n * v + (k + 1) * n] = state[br * n:(br + 1) * n]
            return out
        return patch

    edits = {site: edit_for(site) for site in dict.fromkeys(s for s, _ in variants)}
    with torch.no_grad(), intervene(pipe, edits, branch="both"):
        images = pipe(prompts * v, generator=[g for _ in range(v) for g in _generators(n, seed)], **call).images
    return [images[k * n:(k + 1) * n] for k in range(v)]


def patched_generation(pipe, prompts, donor_prompts, site: str, steps=None, seed: int = 0, donor=None, **call):
    """One variant of ``patched_generations``: ``prompts`` generated with ``site``'s states at ``steps``
    from the generation of ``donor_prompts``."""
    return patched_generations(pipe, prompts, donor_prompts, [(site, steps)], seed, donor, **call)[0]
