"""Causal localisation by activation patching (issue 24): where in the denoiser is an attribute decided?

Two prompts differ in one word ("a red star ..." / "a blue star ..."). The target prompt's generation is
run once, keeping a hidden site's states at every step; the source prompt's generation, from the same
noise, then runs with that site's states replaced by the kept ones (``intervene``, every CFG branch).
If the image now shows the target's attribute, what the site carries at those steps decides it. Both
directions are the same call with the prompts swapped (restore into a corrupted run, or corrupt a clean
run).

    images = patched_generation(pipe, ["a red star"], ["a blue star"], "block.02.image", steps=None)
"""

from __future__ import annotations

import torch

from .hidden import intervene, record_states


def donor_states(pipe, donor_prompts, sites, seed: int = 0, **call):
    """The states of ``sites`` at every step of the generation of ``donor_prompts`` (every CFG row kept),
    for ``patched_generation``; one run serves every site and step window."""
    with torch.no_grad(), record_states(pipe, list(sites), branch="both", tokens="keep") as kept:
        pipe(list(donor_prompts), generator=torch.Generator().manual_seed(seed), **call)
    return kept


def patched_generation(pipe, prompts, donor_prompts, site: str, steps=None, seed: int = 0, donor=None, **call):
    """Generate ``prompts`` with ``site``'s states at ``steps`` (scheduler indices; None: all) taken from
    the generation of ``donor_prompts`` from the same noise (``seed``). ``donor``: that generation's states
    from ``donor_states`` (else it is run here). ``call``: the pipeline's other arguments (steps, guidance,
    size, output_type). Returns the pipeline's images."""
    if len(prompts) != len(donor_prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(donor_prompts)} donor prompts: one donor per prompt")
    kept = donor if donor is not None else donor_states(pipe, donor_prompts, [site], seed, **call)
    index = {s: k for k, s in enumerate(kept.steps)}

    def patch(h, where):
        return kept[site][index[where.step]].to(h.device, h.dtype)

    with torch.no_grad(), intervene(pipe, {site: patch}, steps=steps, branch="both"):
        return pipe(list(prompts), generator=torch.Generator().manual_seed(seed), **call).images
