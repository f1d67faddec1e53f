"""ConceptAttention (Helbling et al., ICML 2025): where a concept is in the image, read from a joint-attention
model's attention *output* space.

    with concept_maps(pipe, ["star", "red", "background"]) as maps:
        pipe(prompt)
    maps.map("star")                      # (h, w): the concept's share per image token, mean over layers/steps
    maps.map("star", kind="probability")  # the same concept tokens' attention-probability map

Each concept is encoded alone, as the prompt is (one token per text stream). The concept tokens enter
the first joint block like the prompt's text and are carried through every block by that block's own
text-side weights (norm and modulation, projections, attention, the residual and MLP updates): they attend
to the block's image keys and to each other, never to the prompt's text, and nothing attends to them, so
the image and the prompt's text stream are untouched: the generation is bit-identical with and without
the reader. At each recorded block the output-space map is o_image . o_concept (the attention outputs before
the output projections), softmaxed over the concepts per image token when read; the probability map is
the image queries' softmax over the concept keys, heads averaged. Memory: the concept rows, never an
(image x image) matrix. The per-block maths is the adapter's (``concept_block``): SD3 / SD3.5 /
toy-mmdit joint blocks, Flux double- and single-stream blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..adapters import get_adapter
from ..adapters.base import as_list
from ..hidden import _Tracker

KINDS = ("output", "probability")


@dataclass
class ConceptMaps:
    concepts: list[str]
    owner: list[int]  # the concept of each concept token
    grid: tuple[int, int] | None = None
    layers: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    # (kind, step, layer) -> (images, image tokens, concept tokens), float32 on the CPU
    raw: dict = field(default_factory=dict)

    def tensor(self, kind: str = "output") -> torch.Tensor:
        """(step, layer, image, concept, h, w): per concept, the output-space map softmaxed over concepts
        (its tokens' dot products averaged first), or the probability mass on its tokens."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not self.raw:
            raise ValueError("no concept map was recorded: call the pipeline inside the `with concept_maps(...)` block")
        owner = torch.tensor(self.owner)
        per = []
        for step in self.steps:
            for layer in self.layers:
                x = self.raw[(kind, step, layer)]
                summed = torch.zeros(*x.shape[:2], len(self.concepts)).index_add_(2, owner, x)
                if kind == "output":
                    summed = (summed / torch.bincount(owner, minlength=len(self.concepts))).softmax(-1)
                per.append(summed)
        t = torch.stack(per).view(len(self.steps), len(self.layers), *per[0].shape)
        return t.movedim(-1, 3).reshape(*t.shape[:3], len(self.concepts), *self.grid)

    def map(self, concept: str, kind: str = "output", layer=None, step=None, image: int = 0) -> torch.Tensor:
        """(h, w) for one concept and image: mean over the chosen layers (names) and steps."""
        if concept not in self.concepts:
            raise KeyError(f"{concept!r} was not a concept; concepts: {self.concepts}")
        t = self.tensor(kind)[:, :, image, self.concepts.index(concept)]
        if step is not None:
            t = t[[self.steps.index(s) for s in as_list(step)]]
        if layer is not None:
            t = t[:, [self.layers.index(name) for name in as_list(layer)]]
        return t.mean(dim=(0, 1))


@contextlib.contextmanager
def concept_maps(pipe, concepts, layers=None, steps=None, branch: str = "cond", embeddings=None):
    """Record ConceptAttention maps of ``concepts`` (words; they need not be in the prompt) at ``layers``
    (joint-block names, default all) and ``steps`` (scheduler-step indices, default all) for the CFG
    ``branch`` rows. ``embeddings``: one text-encoder embedding per concept (concepts, text dim), used
    instead of encoding the words (a pipeline called with prompt_embeds, or without text encoders)."""
    adapter = get_adapter(pipe)
    if not hasattr(adapter, "concept_block"):
        raise NotImplementedError(f"ConceptAttention needs joint attention; the {adapter.family} family has none "
                                  "(a UNet's text enters by cross-attention)")
    concepts = [str(c) for c in as_list(concepts)]
    if not concepts:
        raise ValueError("give at least one concept")
    blocks = adapter.concept_blocks()
    names = [n for n, _, _ in blocks]
    wanted = names if layers is None else [n for n in names if n in as_list(layers)]
    unknown = [n for n in as_list(layers or []) if n not in names]
    if unknown:
        raise KeyError(f"unknown joint block(s) {unknown}; blocks: {names}")
    if embeddings is not None:
        tokens, owner = torch.as_tensor(embeddings), list(range(len(concepts)))
        if tokens.ndim != 2 or len(tokens) != len(concepts):
            raise ValueError(f"embeddings must be (concepts, text dim) = ({len(concepts)}, ...), got {tuple(tokens.shape)}")
    else:
        with torch.no_grad():
            tokens, owner = adapter.concept_tokens(concepts)
    maps = ConceptMaps(concepts, owner, layers=list(wanted))
    tracker = _Tracker(adapter, steps, branch)
    state = {}

    def start(module, args, kwargs):  # every denoiser call: the concept tokens enter afresh
        tracker(module, args, kwargs)
        rows = adapter.batch_rows(args, kwargs)
        with torch.no_grad():
            c = adapter.concept_stream(tokens.to(adapter.denoiser.dtype))
        state["c"] = c.unsqueeze(0).expand(rows, *c.shape)
        maps.grid = maps.grid or adapter.image_grid(args, kwargs)

    def capture(key, image, where):
        def hook(module, args, output=None):
            image[key] = args[0] if where == "in" else output
        return hook

    def after(name, block, image):
        def hook(module, args, kwargs, output):
            call = tracker.call
            with torch.no_grad():
                out_map, prob_map, state["c"] = adapter.concept_block(name, block, state["c"], kwargs, image)
            if name in wanted and call is not None and call.rows:
                step = call.step
                if step not in maps.steps:
                    maps.steps.append(step)
                for kind, m in (("output", out_map), ("probability", prob_map)):
                    part = m[call.rows].float().cpu()
                    key = (kind, step, name)
                    maps.raw[key] = torch.cat([maps.raw[key], part]) if key in maps.raw else part  # later images append
            image.clear()
            return None
        return hook

    with contextlib.ExitStack() as undo:
        undo.callback(adapter.denoiser.register_forward_pre_hook(start, with_kwargs=True).remove)
        for name, block, taps in blocks:
            image = {}
            for key, (mod, where) in taps.items():
                register = mod.register_forward_pre_hook if where == "in" else mod.register_forward_hook
                undo.callback(register(capture(key, image, where)).remove)
            undo.callback(block.register_forward_hook(after(name, block, image), with_kwargs=True).remove)
        yield maps

