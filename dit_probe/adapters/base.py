"""What every model adapter provides. Adapters are the only place that knows an architecture.

An adapter wraps a diffusers pipeline and answers, for its family:
- where attention lives (``sites``: canonical names -> modules, with their kind and token layout);
- which text streams the denoiser sees and where each sits in its text sequence (``streams``);
- which token positions a word of a prompt occupies in each stream (``word_positions``: the
  pipeline's tokenizers, then the pure ``locate_word``);
- where a denoiser call carries its arguments (``latent_input``, ``text_length``, ``timestep_of``);
- which CFG branch each batch row of a denoiser call belongs to (``branches``);
- the image-token grid of a denoiser call (``image_grid``);
- the model maths: prompt encoding, forward noising to a strength, one denoising step, and
  conversions between the model output and eps / x0 / v.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

# Kinds of attention site, and where image queries and text keys sit in the attention call.
JOINT_IMAGE_TEXT = "joint"  # SD3/SD3.5 joint attention: sequence [image | text]
JOINT_TEXT_IMAGE = "joint-text-first"  # Flux double-stream: [text | image]
SINGLE_TEXT_IMAGE = "single"  # Flux single-stream: [text | image], text length from the transformer call
CROSS = "cross"  # UNet attn2: queries image, keys text
IMAGE_SELF = "image-self"  # SD3.5 dual-attention attn2, UNet attn1: no text keys


# What a recording reads: "queries->keys". image->text is the default (where each word lands in the image).
RELATIONS = ("image->text", "text->image", "image->image", "text->text")
_JOINT = (JOINT_IMAGE_TEXT, JOINT_TEXT_IMAGE, SINGLE_TEXT_IMAGE)


def check_relation(relation: str) -> None:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")


@dataclass(frozen=True)
class AttentionSite:
    name: str  # canonical, e.g. "block.07.joint", "up.1.0.cross"
    path: str  # module path inside the denoiser, e.g. "transformer_blocks.7.attn"
    kind: str
    note: str = ""
    # where the layer's image grid is read: a module whose input hidden_states is (B, C, H, W) at the
    # layer's own resolution (UNet: its Transformer2DModel). "" = the denoiser's token grid (DiTs)
    grid_path: str = ""

    @property
    def has_text(self) -> bool:
        return self.kind != IMAGE_SELF

    def supports(self, relation: str) -> bool:
        """Whether this layer's attention has the relation's queries and keys: text queries exist only in
        joint attention (a UNet's text is never updated); image keys in joint and self-attention."""
        queries, keys = relation.split("->")
        has = {"image": self.kind != CROSS or queries == "image", "text": self.kind in _JOINT}
        if self.kind == CROSS:
            return queries == "image" and keys == "text"
        if self.kind == IMAGE_SELF:
            return queries == keys == "image"
        return has[queries] and has[keys]

    def layout(self, q_len: int, k_len: int, text_len: int) -> dict[str, slice | None]:
        """Where image and text tokens sit among this call's queries and keys: {'image', 'text'} for each
        side ('q_image', 'q_text', 'k_image', 'k_text'), None where a side has none."""
        if self.kind == IMAGE_SELF:
            return {"q_image": slice(0, q_len), "q_text": None, "k_image": slice(0, k_len), "k_text": None}
        img, txt = self.ranges(q_len, k_len, text_len)
        if self.kind == CROSS:
            return {"q_image": img, "q_text": None, "k_image": None, "k_text": txt}
        return {"q_image": img, "q_text": txt, "k_image": img, "k_text": txt}  # joint: one sequence for both

    def ranges(self, q_len: int, k_len: int, text_len: int) -> tuple[slice, slice]:
        """(image-query slice, text-key slice) inside one attention call."""
        if self.kind == JOINT_IMAGE_TEXT:
            layout_ok = q_len == k_len and q_len > text_len
            result = slice(0, q_len - text_len), slice(q_len - text_len, k_len)
        elif self.kind in (JOINT_TEXT_IMAGE, SINGLE_TEXT_IMAGE):
            layout_ok = q_len == k_len and q_len > text_len
            result = slice(text_len, q_len), slice(0, text_len)
        elif self.kind == CROSS:
            layout_ok = k_len == text_len
            result = slice(0, q_len), slice(0, k_len)
        else:
            raise ValueError(f"layer {self.name} is image-only self-attention ({self.note}); it has no text keys")
        if not layout_ok:
            raise RuntimeError(
                f"unexpected token layout at {self.name} ({self.kind}): {q_len} queries, {k_len} keys, "
                f"{text_len} text tokens. The attention call does not match this model family's layout "
                "(an IP-adapter or a custom processor may add tokens); recording cannot place the text keys."
            )
        return result


@dataclass(frozen=True)
class HiddenSite:
    """An internal state of the denoiser a user may read or change: the output of a block (h-space), or
    the text a block or cross-attention receives (``input``: the name of the keyword argument)."""

    name: str  # canonical, e.g. "mid.out", "block.07.image", "double.03.text", "block.07.text_in"
    path: str  # the module whose forward output (or input) holds the state
    part: int | None = None  # index into that module's output tuple, None when the output is the state
    layout: str = "tokens"  # "tokens": (B, N, C); "spatial": (B, C, H, W)
    input: str | None = None  # a keyword argument of the module's forward: the state is that input


@dataclass(frozen=True)
class TextStream:
    name: str  # "clip" or "t5"
    tokenizer: Any
    offset: int  # first position of this stream in the denoiser's text sequence
    length: int  # number of positions


@dataclass(frozen=True)
class StreamTokens:
    """One stream's tokenization of a prompt, one entry per position of the stream (BOS, EOS and
    padding included, so list index + offset is the position in the denoiser's text sequence)."""

    name: str
    offset: int  # first position of this stream in the denoiser's text sequence
    tokens: Sequence[str]
    spans: Sequence[tuple[int, int]]  # character span of each token in the prompt; empty (a == b) for specials
    pad: str | None = None  # the padding token, dropped when tokens are shown

    def visible(self) -> list[str]:
        """The tokens without padding (a pad token that covers prompt text is kept)."""
        return [t for t, (a, b) in zip(self.tokens, self.spans) if t != self.pad or b > a]


@dataclass
class Conditioning:
    """Encoded prompts, conditional and (for CFG) unconditional; batch-first tensors."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # the text's attention mask, where the denoiser reads one (PixArt)
    neg_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # not batched (Flux: txt_ids)

    _BATCHED = ("embeds", "pooled", "neg_embeds", "neg_pooled", "mask", "neg_mask")

    def map(self, fn) -> "Conditioning":
        """Apply ``fn`` to every batched tensor (None stays None)."""
        return Conditioning(**{k: None if getattr(self, k) is None else fn(getattr(self, k)) for k in self._BATCHED},
                            extra=dict(self.extra))

    @staticmethod
    def cat(parts: "Sequence[Conditioning]") -> "Conditioning":
        """Concatenate along the batch axis."""
        first = parts[0]
        out = {}
        for k in Conditioning._BATCHED:
            vals = [getattr(p, k) for p in parts]
            out[k] = None if vals[0] is None else torch.cat(vals)
        return Conditioning(**out, extra=dict(first.extra))

    def __len__(self) -> int:
        return self.embeds.shape[0]


class Adapter:
    family: str = ""
    denoiser_attr: str = ""
    # whether guidance means classifier-free guidance (a negative branch); Flux-dev's is embedded instead
    classifier_free_guidance: bool = True

    def __init__(self, pipe):
        self.pipe = pipe
        self._sites = self._find_sites()

    # ----- architecture -----
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    def _find_sites(self) -> list[AttentionSite]:
        raise NotImplementedError

    def hidden_sites(self) -> list[HiddenSite]:
        """The internal states ``intervene`` and ``record_states`` can reach, in forward order."""
        raise NotImplementedError

    def text_input_sites(self) -> list[HiddenSite]:
        """The text each text-reading layer receives, in forward order (``name.text_in``): a joint block's
        incoming text stream, a cross-attention's encoder states. Patching these is LocoGen's text swap."""
        raise NotImplementedError

    def hidden_site(self, name: str) -> HiddenSite:
        by_name = {h.name: h for h in [*self.hidden_sites(), *self.text_input_sites()]}
        if name not in by_name:
            raise KeyError(f"unknown hidden site {name!r} for this {self.family} model; sites are: {', '.join(by_name)}")
        return by_name[name]

    def sites(self, recordable_only: bool = False) -> list[AttentionSite]:
        return [s for s in self._sites if s.has_text] if recordable_only else list(self._sites)

    def module(self, site: AttentionSite) -> torch.nn.Module:
        return self.denoiser.get_submodule(site.path)

    def attention_output_weight(self, site: AttentionSite) -> torch.Tensor:
        """The projection from a layer's attention output (heads x dim, head h in columns h*dim..) to the
        residual stream of its image tokens (``attention.edit.contributions``)."""
        return self.module(site).to_out[0].weight

    def check_recordable(self) -> None:
        """Refuse, with what to do, a pipeline whose denoiser calls the recorder would misread: PAG
        pipelines (a perturbed branch batched with the CFG rows, through their own processors) and
        schedulers of order 2 (Heun, KDPM2: two denoiser calls per step at different timesteps, which
        would be counted as two steps)."""
        name = type(self.pipe).__name__
        if "PAG" in name:
            raise ValueError(f"{name} is a perturbed-attention-guidance pipeline: its perturbed rows are batched "
                             "with the CFG rows and would be misread. Record the plain pipeline "
                             f"({name.replace('PAG', '')}) instead")
        order = getattr(self.pipe.scheduler, "order", 1)
        if order > 1:
            raise ValueError(f"the scheduler {type(self.pipe.scheduler).__name__} is of order {order}: it calls the "
                             "denoiser more than once per step at different timesteps, so steps would be miscounted. "
                             "Record with a first-order scheduler (e.g. the pipeline's default)")

    def select_sites(self, layers=None, relation: str = "image->text") -> list[AttentionSite]:
        """Resolve a layer selection: None (every layer that has the relation's queries and keys; for
        image->text, all with text keys), or a list of canonical names, glob patterns ('block.*.joint') or
        integer indices into those layers."""
        recordable = [s for s in self._sites if s.supports(relation)]
        if not recordable:
            why = ("its cross-attention has no text queries: text tokens are never updated by cross-attention"
                   if relation.startswith("text") else "it has no such attention")
            raise ValueError(f"this {self.family} model has no layer for relation {relation!r}: {why}")
        if layers is None:
            return recordable
        if isinstance(layers, (str, int)):
            layers = [layers]
        by_name = {s.name: s for s in self._sites}
        chosen: list[AttentionSite] = []
        for sel in layers:
            if isinstance(sel, int):
                if not -len(recordable) <= sel < len(recordable):
                    raise IndexError(
                        f"layer index {sel} out of range: this {self.family} model has {len(recordable)} "
                        f"recordable attention layers for {relation} (0..{len(recordable) - 1})"
                    )
                hits = [recordable[sel]]
            elif any(c in sel for c in "*?["):
                hits = [s for s in self._sites if fnmatch.fnmatchcase(s.name, sel)]
            else:
                hits = [by_name[sel]] if sel in by_name else []
            if not hits:
                raise KeyError(
                    f"unknown layer {sel!r} for this {self.family} model; layers are: "
                    + ", ".join(s.name for s in self._sites)
                )
            for s in hits:
                if not s.supports(relation):
                    if isinstance(sel, str) and sel == s.name:
                        if relation == "image->text":
                            raise ValueError(f"layer {s.name} is image-only self-attention ({s.note}); it has no "
                                             "text keys to record")
                        raise ValueError(f"layer {s.name} ({s.note or s.kind + ' attention'}) has no {relation} "
                                         "attention: choose layers from sites() that have it")
                    continue  # a glob may cover other kinds of layer: skip them, they are labelled in sites()
                if s not in chosen:
                    chosen.append(s)
        if not chosen:
            raise ValueError(f"the layer selection {layers!r} contains no layer for relation {relation!r}")
        return chosen

    # ----- text -----
    def streams(self, text_len: int | None = None) -> list[TextStream]:
        raise NotImplementedError

    @staticmethod
    def _encode(tokenizer, prompt: str, length: int):
        return tokenizer(
            prompt, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True
        )

    def tokenize(self, prompt: str, text_len: int | None = None) -> list[StreamTokens]:
        """``prompt`` as each stream's tokenizer pads and truncates it for the denoiser."""
        out = []
        for st in self.streams(text_len):
            enc = self._encode(st.tokenizer, prompt, st.length)
            toks = st.tokenizer.convert_ids_to_tokens(enc["input_ids"])
            spans = [tuple(span) for span in enc["offset_mapping"]]
            out.append(StreamTokens(st.name, st.offset, toks, spans, st.tokenizer.pad_token))
        return out

    def tokens(self, prompt: str, text_len: int | None = None) -> dict[str, list[str]]:
        """The tokens of ``prompt`` in each stream (padding dropped)."""
        return {st.name: st.visible() for st in self.tokenize(prompt, text_len)}

    def word_positions(self, prompt: str, word: str, text_len: int | None = None,
                       occurrence: str | int = "first") -> dict[str, list[int]]:
        """Positions of ``word`` in the denoiser's text sequence, per stream: ``locate_word`` on the
        pipeline's own tokenization of ``prompt``."""
        _require_text(prompt)  # before tokenizing: a None prompt would fail inside the tokenizer
        return locate_word(prompt, word, self.tokenize(prompt, text_len), occurrence=occurrence)

    @staticmethod
    def encoded_prompt(call_args: tuple, call_kwargs: dict):
        """The prompt(s) of a call to the pipeline's ``encode_prompt`` (its first argument in every family)."""
        return call_kwargs.get("prompt", call_args[0] if call_args else None)

    # ----- denoiser calls -----
    def latent_input(self, call_args: tuple, call_kwargs: dict) -> torch.Tensor:
        """The noisy latents a denoiser call receives (transformers name them ``hidden_states``)."""
        return call_kwargs.get("hidden_states", call_args[0] if call_args else None)

    def batch_rows(self, call_args: tuple, call_kwargs: dict) -> int:
        """Batch rows of a denoiser call (both CFG halves when the pipeline batches them)."""
        return self.latent_input(call_args, call_kwargs).shape[0]

    def text_length(self, call_kwargs: dict) -> int:
        return call_kwargs["encoder_hidden_states"].shape[1]

    def image_grid(self, call_args: tuple, call_kwargs: dict) -> tuple[int, int]:
        raise NotImplementedError

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The denoiser's image-token grid (what ``image_grid`` reads from a call) for an image of
        height x width pixels, as the pipeline sizes its latents."""
        raise NotImplementedError

    def layer_grid(self, site: AttentionSite, grid: tuple[int, int]) -> tuple[int, int]:
        """The image-token grid at ``site`` when the denoiser's input grid is ``grid`` (the same for
        every layer of a DiT)."""
        return tuple(grid)

    def scheduler_timestep(self, call_t: float) -> float:
        """A denoiser call's timestep in the scheduler's units (what ``scheduler.timesteps`` holds)."""
        return call_t

    def timestep_of(self, call_args: tuple, call_kwargs: dict) -> float:
        t = call_kwargs.get("timestep")
        if t is None and len(call_args) > 1:
            t = call_args[1]
        return float(torch.as_tensor(t).flatten()[0])

    def call_branches(self, call_args: tuple, call_kwargs: dict, call_in_step: int) -> list[str]:
        """CFG branch of each batch row of a denoiser call (what the recorder and ``intervene`` use)."""
        return self.branches(self.batch_rows(call_args, call_kwargs), call_in_step)

    def branches(self, batch_rows: int, call_in_step: int) -> list[str]:
        """CFG branch of each batch row of a denoiser call: SD3 and SD pipelines batch [uncond | cond]."""
        cfg = bool(getattr(self.pipe, "_guidance_scale", 1.0) > 1.0) and getattr(
            self.pipe, "do_classifier_free_guidance", False
        )
        if cfg and batch_rows % 2 == 0:
            return ["uncond"] * (batch_rows // 2) + ["cond"] * (batch_rows // 2)
        return ["cond"] * batch_rows

    def num_steps(self) -> int | None:
        """Denoising steps of the generation in progress (set by the pipeline before its loop)."""
        return getattr(self.pipe, "_num_timesteps", None)

    # ----- images <-> latents: 4D (batch, channels, h, w) in the denoiser's convention, every family -----
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def default_image_size(self) -> int:
        """The pipeline's default height = width in pixels (its settings first, then its config)."""
        settings = getattr(self.pipe, "dit_probe_settings", {})
        if settings.get("height"):
            return int(settings["height"])
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(size) * self.vae_scale_factor

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> model latents: the VAE posterior mean, shifted and scaled
        as the pipeline does (SD3/Flux: ``(x - shift) * scale``; SD: ``x * scale``)."""
        vae = self.pipe.vae
        lat = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (lat - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents -> (B, 3, H, W) pixels in [-1, 1] (not clamped)."""
        vae = self.pipe.vae
        lat = z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        return vae.decode(lat, return_dict=False)[0]

    # ----- model maths (overridden per family) -----
    def encode_prompt(self, prompt, negative_prompt="", do_cfg: bool = True) -> Conditioning:
        raise NotImplementedError

    def eps(self, z, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The model's noise prediction at (z, t) (CFG when cond has a negative and guidance_scale > 1)."""
        return self.to_eps(self.predict(z, t, cond, guidance_scale=guidance_scale), z, t)

    # ----- ConceptAttention (attention.concepts; joint-attention families define concept_block) -----
    def concept_tokens(self, concepts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Each concept encoded alone, as the prompt is; per text stream the mean of its word's pieces is one
        concept token (SD3: a CLIP and a T5 token; Flux: a T5 token). Returns (tokens (n, text dim), the
        concept of each)."""
        tokens, owner = [], []
        for i, concept in enumerate(concepts):
            emb = self.encode_prompt(concept, do_cfg=False).embeds[0]
            for positions in self.word_positions(concept, concept, text_len=emb.shape[0]).values():
                tokens.append(emb[positions].mean(0))
                owner.append(i)
        return torch.stack(tokens), owner

    def concept_stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """Concept tokens as they enter the first block: the text stream's own embedding."""
        return self.denoiser.context_embedder(tokens)

    def next_signal_scale(self, t) -> float:
        """The weight of the predicted x0 in the latent that the scheduler's step from ``t`` lands on (a' in
        z' = a' x0 + b' eps): the asymmetric reverse process (``editing.asyrp``) needs it."""
        raise NotImplementedError

    def set_timesteps(self, num_steps: int, strength: float = 1.0, latents=None) -> torch.Tensor:
        """The timesteps a generation (strength 1) or an img2img edit (strength < 1) denoises through.
        ``latents``: the 4D latents to be denoised (Flux shifts its schedule by their size)."""
        check_strength(strength)
        self.pipe.scheduler.set_timesteps(num_steps)
        return self.pipe.scheduler.timesteps[self.first_step(num_steps, strength):]

    def noise_levels(self, num_steps: int, latents=None) -> list[tuple[float, float]]:
        """Every start an img2img edit with ``num_steps`` steps can have: (strength, log-SNR of its first
        timestep), from low to high noise, pure noise (log-SNR -inf) left out. The strengths are the ones
        ``set_timesteps`` itself maps to each start (k/n, nudged where float rounding skips a step)."""
        starts = {}
        for k in range(1, num_steps + 1):
            for s in (k / num_steps, k / num_steps + 1e-9, k / num_steps - 1e-9):
                if 0 < s <= 1:
                    ts = self.set_timesteps(num_steps, s, latents=latents)
                    if len(ts) and len(ts) not in starts:
                        starts[len(ts)] = (s, float(self.log_snr(ts[0])))
        return [starts[k] for k in sorted(starts) if math.isfinite(starts[k][1])]

    def strength_for_log_snr(self, target: float, num_steps: int, latents=None) -> tuple[float, float]:
        """The strength whose first timestep's log-SNR is nearest ``target`` on this model's own schedule,
        and that log-SNR (schedules are discrete: the match is as close as the steps allow)."""
        levels = self.noise_levels(num_steps, latents)
        if not levels:
            raise ValueError(f"{num_steps} steps leave no start below pure noise")
        return min(levels, key=lambda lv: abs(lv[1] - float(target)))

    @staticmethod
    def first_step(num_steps: int, strength: float) -> int:
        """Index of the first denoising step at ``strength``, as the family's diffusers Img2Img pipeline
        computes it (SD: n - int(n s))."""
        return num_steps - min(int(num_steps * strength), num_steps)


def guided(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a [uncond | cond] batch of predictions."""
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class PatchGrid:
    """The image-token grid of a DiT that patchifies a 4D latent (SD3, PixArt): latent size / patch size."""

    def image_grid(self, call_args, call_kwargs):
        x = self.latent_input(call_args, call_kwargs)
        p = self.denoiser.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def token_grid(self, height, width):
        f = self.vae_scale_factor * self.denoiser.config.patch_size
        return height // f, width // f


def _require_text(prompt) -> None:
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: there are no words to record; give token indices instead")


def check_occurrence(occurrence) -> None:
    if not (occurrence in ("first", "all") or (isinstance(occurrence, int) and not isinstance(occurrence, bool)
                                               and occurrence >= 1)):
        raise ValueError(f"occurrence must be 'first', 'all' or a number >= 1 (the k-th occurrence), got {occurrence!r}")


def locate_word(prompt: str, word: str, streams: Sequence[StreamTokens], split_words: str = "sum",
                occurrence: str | int = "first") -> dict[str, list[int]]:
    """Positions of ``word`` (a word or phrase) of ``prompt`` in the denoiser's text sequence, per stream.

    ``occurrence``: which occurrence of a repeated word counts: "first" (the default), "all" (every
    occurrence's positions, so their maps are summed) or k >= 1 (the k-th; one that does not exist raises
    KeyError saying how many there are). Matching is whole-word and case-insensitive. A token belongs to the
    word when its character span overlaps the word's, so every piece of a word the tokenizer splits is
    included (its maps are then summed); ``split_words="refuse"`` raises ValueError for a split word
    instead. A stream where the word was truncated away is left out; a word in no stream raises
    KeyError listing the prompt's tokens. Pure: the tokenization comes in ``streams``.
    """
    if split_words not in ("sum", "refuse"):
        raise ValueError(f"split_words must be 'sum' or 'refuse', got {split_words!r}")
    check_occurrence(occurrence)
    _require_text(prompt)
    found = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", prompt, flags=re.IGNORECASE)]
    if isinstance(occurrence, int) and found:
        if occurrence > len(found):
            raise KeyError(f"word {word!r} occurs {len(found)} time(s) in prompt {prompt!r}; occurrence={occurrence} "
                           "does not exist")
        found = [found[occurrence - 1]]
    elif occurrence == "first":
        found = found[:1]
    out: dict[str, list[int]] = {}
    for lo, hi in found:
        for st in streams:
            # enumerate every position (BOS included) so that index + offset is the sequence position
            pos = [st.offset + i for i, (a, b) in enumerate(st.spans) if b > a and a < hi and b > lo]
            if pos:
                out.setdefault(st.name, []).extend(p for p in pos if p not in out.get(st.name, []))
    if not out:
        raise KeyError(
            f"word {word!r} is not in prompt {prompt!r} (or was truncated away); the prompt's tokens are: "
            + "; ".join(f"{st.name}: {st.visible()}" for st in streams)
        )
    if split_words == "refuse":
        n_words = len(word.split()) * len(found)  # one token per word when none of its words is split
        split = {
            st.name: [st.tokens[p - st.offset] for p in out[st.name]]
            for st in streams
            if len(out.get(st.name, [])) > n_words
        }
        if split:
            raise ValueError(
                f"the tokenizer splits {word!r} into several tokens ({split}); use split_words='sum' to add "
                "the pieces' maps, or choose a single-token word"
            )
    return out


def concept_attention(qx, kx, vx, ox, qc, kc, vc):
    """ConceptAttention's attention, (rows, heads, tokens, dim) inputs: concept queries over [image keys |
    concept keys]. Returns (the concepts' attention output (rows, n, heads x dim), the output-space map
    ox . oc (rows, image tokens, n) with ``ox`` the image attention output (rows, image tokens, heads x dim),
    and the image queries' softmax over the concept keys, heads averaged)."""
    oc = torch.nn.functional.scaled_dot_product_attention(qc, torch.cat([kx, kc], 2), torch.cat([vx, vc], 2))
    oc = oc.transpose(1, 2).reshape(qc.shape[0], qc.shape[2], -1)
    out_map = ox.float() @ oc.float().transpose(1, 2)
    prob = ((qx.float() @ kc.float().transpose(-1, -2)) * qx.shape[-1] ** -0.5).softmax(-1).mean(1)
    return oc, out_map, prob


def check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and 0.0 < float(strength) <= 1.0):
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")


def block_name(prefix: str, index: int, suffix: str) -> str:
    return f"{prefix}.{index:02d}.{suffix}"


def as_list(x) -> list:
    if x is None:
        return []
    return [x] if isinstance(x, (str, int)) else list(x)


def ensure_prompts(prompt) -> Sequence[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)
