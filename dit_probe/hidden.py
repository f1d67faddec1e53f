"""Hidden states of the denoiser (h-space and the joint streams): read them, or change them.

    with intervene(pipe, {"mid.out": delta}, steps=range(10), branch="cond"):
        images = pipe(prompt).images          # delta added to the bottleneck of the conditional rows
    with record_states(pipe, ["mid.out", "up.1.out"]) as states:
        pipe(prompt)
    states["mid.out"]                         # (step, batch, channels): mean over positions

Sites are the adapters' ``hidden_sites()`` (UNet: ``down.B.out``, ``mid.out``, ``up.B.out``; SD3/SD3.5:
``block.NN.image`` / ``block.NN.text``; Flux: ``double.NN.image|text``, ``single.NN.image|text``), and
their ``text_input_sites()``: the text a block or cross-attention receives (``block.NN.text_in``,
``double.NN.text_in``, UNet ``down.1.0.0.text_in``, ...).
Steps are indices into the scheduler's timesteps (negative from the end), so they mean the same thing
in a pipeline's own loop and in the editor's. Branches are the adapter's CFG rows ('cond', 'uncond').
Forward hooks are registered per module instance and removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .adapters import get_adapter
from .adapters.base import HiddenSite, as_list

BRANCHES = {"cond": ("cond",), "uncond": ("uncond",), "both": ("uncond", "cond")}


@dataclass
class Call:
    """Where the denoiser is: the step (index into the scheduler's timesteps), the timestep the denoiser
    was called with, which batch rows are in the selected branches, and ``time``: the scheduler's timestep
    as a fraction of its training steps (1 = pure noise), the same scale for every family."""

    step: int | None
    timestep: float
    rows: list[int]
    time: float = 1.0
    batch: int = 0  # rows of the whole denoiser call
    text_len: int = 0  # positions of the denoiser's text sequence


class _Tracker:
    """A denoiser pre-hook that knows, at each call, its step and the CFG branch of each batch row."""

    def __init__(self, adapter, steps, branch: str):
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {list(BRANCHES)}, got {branch!r}")
        self.adapter, self.branches = adapter, BRANCHES[branch]
        self.steps = None if steps is None else [int(s) for s in as_list(list(steps) if isinstance(steps, range) else steps)]
        self.call: Call | None = None
        self._last_t, self._in_step = None, 0

    def _step(self, t: float) -> int | None:
        ts = getattr(self.adapter.pipe.scheduler, "timesteps", None)
        if ts is None or len(ts) == 0:
            return None
        return int((ts.detach().float().cpu() - self.adapter.scheduler_timestep(t)).abs().argmin())

    def wanted(self, step: int | None) -> bool:
        if self.steps is None:
            return True
        if step is None:
            return False
        n = len(self.adapter.pipe.scheduler.timesteps)
        return any(step == (s % n) for s in self.steps)

    def __call__(self, module, args, kwargs):
        t = self.adapter.timestep_of(args, kwargs)
        self._in_step = self._in_step + 1 if t == self._last_t else 0
        self._last_t = t
        batch = self.adapter.batch_rows(args, kwargs)
        branch_of_row = self.adapter.call_branches(args, kwargs, self._in_step)
        step = self._step(t)
        rows = [r for r, b in enumerate(branch_of_row) if b in self.branches] if self.wanted(step) else []
        train = self.adapter.pipe.scheduler.config.num_train_timesteps
        self.call = Call(step, t, rows, self.adapter.scheduler_timestep(t) / train, batch, self.adapter.text_length(kwargs))


def _sites(adapter, names) -> list[HiddenSite]:
    return [adapter.hidden_site(n) for n in as_list(names)]


def _state(output, site: HiddenSite):
    return output if site.part is None else output[site.part]


def _with_state(output, site: HiddenSite, new):
    if site.part is None:
        return new
    parts = list(output)
    parts[site.part] = new
    return type(output)(parts)


def _hook(undo: contextlib.ExitStack, adapter, site: HiddenSite, fn) -> None:
    """Call ``fn(state)`` each time the site's module runs; a tensor it returns replaces the state. Output
    sites hook the module's output; input sites (``site.input``) the keyword argument it is called with."""
    module = adapter.denoiser.get_submodule(site.path)
    if site.input is None:
        def after(module, args, output):
            new = fn(_state(output, site))
            return None if new is None else _with_state(output, site, new)

        undo.callback(module.register_forward_hook(after).remove)
        return

    def before(module, args, kwargs):
        if site.input not in kwargs:
            raise RuntimeError(f"hidden site {site.name}: {site.path} was called without the keyword argument "
                               f"{site.input!r}, so its input cannot be read or changed (a diffusers version that "
                               "passes it positionally?)")
        new = fn(kwargs[site.input])
        return None if new is None else (args, {**kwargs, site.input: new})

    undo.callback(module.register_forward_pre_hook(before, with_kwargs=True).remove)


def _as_edit(edit):
    """A callable (h_rows, call) -> new h_rows from a tensor delta (added) or a callable."""
    if callable(edit):
        return edit
    delta = torch.as_tensor(edit)
    return lambda h, call: h + delta.to(h.device, h.dtype)


@contextlib.contextmanager
def intervene(pipe, edits: dict, steps=None, branch: str = "cond"):
    """Change hidden states while the block runs: ``edits`` maps a hidden site to a tensor added to the
    state of the selected rows (broadcast to (rows, ...)), or to a function (h_rows, call) -> new h_rows.
    ``steps``: scheduler-step indices (default all); ``branch``: 'cond' (default), 'uncond' or 'both'.
    The identity edit leaves the output bit-identical."""
    adapter = get_adapter(pipe)
    if not edits:
        raise ValueError("intervene needs at least one {site: edit}")
    tracker = _Tracker(adapter, steps, branch)
    plan = [(site, _as_edit(edit)) for site, edit in zip(_sites(adapter, list(edits)), edits.values())]
    with contextlib.ExitStack() as undo:
        undo.callback(adapter.denoiser.register_forward_pre_hook(tracker, with_kwargs=True).remove)
        for site, fn in plan:
            def change(h, fn=fn):
                call = tracker.call
                if call is None or not call.rows:
                    return None
                if h.shape[0] == 1 < call.batch:  # one text for every row (a broadcast negative prompt)
                    h = h.expand(call.batch, *h.shape[1:])
                rows = torch.tensor(call.rows, device=h.device)
                new = h.clone()
                new[rows] = fn(h[rows], call)
                return new

            _hook(undo, adapter, site, change)
        yield


class HiddenStates(dict):
    """site -> tensor (step, batch, channels) with tokens='mean' (the mean over positions), or
    (step, batch, positions, channels) / (step, batch, channels, h, w) with tokens='keep'. ``steps``: the
    scheduler-step index of each entry along the first axis."""

    steps: list


@contextlib.contextmanager
def record_states(pipe, sites, steps=None, branch: str = "cond", tokens: str = "mean"):
    """Read hidden states while the block runs, reduced as they come (mean over positions, kept, or a
    function of the selected rows' state, e.g. a pooling), on the CPU in float32. Several generations
    append along the batch axis."""
    if not callable(tokens) and tokens not in ("mean", "keep"):
        raise ValueError(f"tokens must be 'mean', 'keep' or a function of the state, got {tokens!r}")
    adapter = get_adapter(pipe)
    tracker = _Tracker(adapter, steps, branch)
    chosen = _sites(adapter, sites)
    seen: dict[str, dict[int, list]] = {s.name: {} for s in chosen}
    out = HiddenStates()
    with contextlib.ExitStack() as undo:
        undo.callback(adapter.denoiser.register_forward_pre_hook(tracker, with_kwargs=True).remove)
        for site in chosen:
            def read(state, site=site):
                call = tracker.call
                if call is None or not call.rows:
                    return None
                if state.shape[0] == 1 < call.batch:
                    state = state.expand(call.batch, *state.shape[1:])
                h = state[call.rows].detach().float()
                if callable(tokens):
                    h = tokens(h)
                elif tokens == "mean":
                    h = h.mean(dim=(2, 3)) if site.layout == "spatial" else h.mean(dim=1)
                seen[site.name].setdefault(call.step, []).append(h.cpu())
                return None

            _hook(undo, adapter, site, read)
        try:
            yield out
        finally:
            undo.close()
            steps_seen = sorted({s for per in seen.values() for s in per})
            out.steps = steps_seen
            for name, per in seen.items():
                if per:
                    out[name] = torch.stack([torch.cat(per[s]) for s in steps_seen])
