"""What one attention layer does with a word's tokens: measure it, withhold it, knock a head out (issue 24).

- ``contributions``: the attention contribution of a word at each layer and head (Zarei et al., NeurIPS
  2025): what the word's tokens add to the image queries' attention output, sum_j p_qj v_j over the
  word's key positions j, carried through the layer's output projection into the residual stream, its
  norm averaged over image queries. Per head (that head's columns of the projection) and per layer (all
  heads together). Ranking layers by it is the instrument's claim of where the word acts.
- ``withhold``: the image queries of the chosen layers cannot attend to the word's tokens (their logits
  are -inf, the softmax renormalises over the rest); every other query and layer is unchanged. With the
  ranking above: withhold the word from the top-K layers vs K random vs the bottom K.
- ``knock_out``: remove one head's text-to-image contribution at a layer (``mode='zero'``: the image
  queries keep only what they read from image keys; ``'mean'``: the contribution is replaced by its mean
  over the batch's selected rows, so what is common to the prompts stays).

All three see the attention call as the processor makes it: the layer's processor is wrapped as the
recorder wraps it, and its scaled_dot_product_attention call is intercepted (``recorder._wrap``). Steps and
CFG branches are chosen as in ``intervene``. Without a change the output is bit-identical.

    with contributions(pipe, prompts, "red") as c:
        pipe(prompts)
    c.layer["block.02.joint"]            # (step, prompt, ) ; c.heads[...] (step, prompt, head)
    with withhold(pipe, prompts, "red", layers=["block.02.joint"]):
        images = pipe(prompts).images
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..adapters import get_adapter
from ..adapters.base import AttentionSite, as_list, ensure_prompts
from ..hidden import Call, _Tracker
from .recorder import _ORIGINAL_SDPA, _install, _uninstall, _wrap

MODES = ("zero", "mean")


@dataclass
class AttentionCall:
    """One scaled-dot-product-attention call of a layer, as its processor made it. ``q``, ``k``, ``v``:
    (batch, heads, tokens, dim) with grouped-query keys repeated to the query heads; ``out``: the
    attention output (batch, heads, queries, dim); ``layout``: where image and text sit among queries
    and keys (``AttentionSite.layout``); ``call``: the step and the selected CFG rows."""

    site: AttentionSite
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    layout: dict
    call: Call

    def image_probs(self, rows: list[int], head: int) -> torch.Tensor:
        """The image queries' softmax over every key, (rows, image queries, keys), one head at a time
        (an image x keys matrix per row: never all heads at once)."""
        img = self.layout["q_image"]
        q = self.q[rows, head, img]
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = (q.to(dtype) @ self.k[rows, head].to(dtype).transpose(-1, -2)) * self.scale
        if self.mask is not None:
            logits = logits + self._mask_rows(rows)[:, min(head, self.mask.shape[1] - 1), img].to(dtype)
        return logits.softmax(-1)

    def _mask_rows(self, rows):
        m = self.mask.broadcast_to(self.q.shape[0], self.mask.shape[1], self.q.shape[2], self.k.shape[2])[rows]
        return torch.zeros_like(m, dtype=self.q.dtype).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m

    def read(self, rows: list[int], head: int, cols: list[list[int]]) -> torch.Tensor:
        """What the image queries of ``rows`` read from the keys ``cols[r]`` (positions among this call's
        keys) at ``head``: sum_j p_qj v_j, (rows, image queries, dim)."""
        p = self.image_probs(rows, head)
        keep = torch.zeros_like(p[:, :1])  # (rows, 1, keys)
        for r, c in enumerate(cols):
            keep[r, 0, c] = 1
        return (p * keep) @ self.v[rows, head].to(p.dtype)


class _Interceptor:
    """Wraps the chosen layers' processors; at each call with selected rows, ``handler(AttentionCall)``
    may return a new attention output (batch, heads, queries, dim)."""

    def __init__(self, pipe, layers, steps, branch: str, handler):
        self.adapter = get_adapter(pipe)
        names = [s.name for s in self.adapter.sites(recordable_only=True)]
        wanted = as_list(layers) if layers is not None else names
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise KeyError(f"unknown attention layer(s) {unknown} (text-reading layers: {', '.join(names)})")
        self.sites = [s for s in self.adapter.sites(recordable_only=True) if s.name in wanted]
        self.tracker = _Tracker(self.adapter, steps, branch)
        self.handler = handler

    def _wants_now(self) -> bool:
        call = self.tracker.call
        return call is not None and bool(call.rows)

    def _attend(self, site, q, k, v, attn_mask, dropout_p, is_causal, scale, kw):
        out = _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if is_causal or dropout_p:
            raise ValueError(f"layer {site.name}: causal or dropout attention cannot be edited")
        kk, vv = k, v
        if k.shape[1] != q.shape[1]:  # grouped-query attention, repeated as SDPA's enable_gqa does
            kk, vv = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        call = self.tracker.call
        a = AttentionCall(site, q, kk, vv, out, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale,
                          site.layout(q.shape[-2], k.shape[-2], call.text_len), call)
        with torch.no_grad():
            new = self.handler(a)
        return out if new is None else new

    @contextlib.contextmanager
    def installed(self):
        with contextlib.ExitStack() as undo:
            undo.callback(self.adapter.denoiser.register_forward_pre_hook(self.tracker, with_kwargs=True).remove)
            for site in self.sites:
                mod = self.adapter.module(site)
                original = mod.processor
                mod.set_processor(_wrap(original, site, self))
                undo.callback(mod.set_processor, original)
            _install()
            undo.callback(_uninstall)
            yield


class _WordKeys:
    """The word's key columns (every text stream) for each selected row of a call: row j is prompt
    j mod len(prompts), and ``words`` is one word for every prompt or one per prompt."""

    def __init__(self, adapter, prompts, words):
        self.adapter, self.prompts = adapter, list(ensure_prompts(prompts))
        self.words = [words] * len(self.prompts) if isinstance(words, str) else list(words)
        if len(self.words) != len(self.prompts):
            raise ValueError(f"{len(self.words)} words for {len(self.prompts)} prompts: give one word, or one per prompt")
        self._cache: dict[int, list[list[int]]] = {}

    def __call__(self, a: AttentionCall) -> list[list[int]]:
        n = a.call.text_len
        if n not in self._cache:
            self._cache[n] = [sorted({i for pos in self.adapter.word_positions(p, w, n).values() for i in pos})
                              for p, w in zip(self.prompts, self.words)]
        per_prompt, start = self._cache[n], a.layout["k_text"].start or 0
        return [[start + i for i in per_prompt[j % len(per_prompt)]] for j in range(len(a.call.rows))]


class Contributions:
    """``layer[name]``: (step, row) the norm of the word's contribution to the layer's output, mean over
    image queries; ``heads[name]``: (step, row, head) the same per head. Rows: the selected CFG rows of
    every generation run inside the context, in order. ``steps``: scheduler-step index of each entry."""

    def __init__(self):
        self.layer: dict[str, torch.Tensor] = {}
        self.heads: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []

    def ranking(self, step: int | None = None) -> list[str]:
        """Layers from the largest contribution to the smallest (mean over rows and steps, or at ``step``)."""
        score = {n: float((t if step is None else t[self.steps.index(step)]).mean()) for n, t in self.layer.items()}
        return sorted(score, key=score.get, reverse=True)


@contextlib.contextmanager
def contributions(pipe, prompts, word, layers=None, steps=None, branch: str = "cond"):
    """Measure the attention contribution of ``word`` (one word, or one per prompt) at ``layers``
    (text-reading attention layers, default all) and ``steps`` while the pipeline runs ``prompts`` (in the
    order given to it)."""
    adapter = get_adapter(pipe)
    keys = _WordKeys(adapter, prompts, word)
    seen: dict[str, dict[int, list]] = {}
    result = Contributions()

    def measure(a: AttentionCall):
        rows, cols = a.call.rows, keys(a)
        w = adapter.attention_output_weight(a.site)  # (out, heads * dim)
        heads, d = a.q.shape[1], a.v.shape[-1]
        total, per_head = 0, []
        for h in range(heads):
            c = a.read(rows, h, cols)  # (rows, image queries, dim): what the word's keys give this head
            c = c @ w[:, h * d:(h + 1) * d].T.to(c.dtype)  # into the residual stream
            per_head.append(c.norm(dim=-1).mean(-1))
            total = total + c
        entry = (total.norm(dim=-1).mean(-1).float().cpu(), torch.stack(per_head, -1).float().cpu())
        seen.setdefault(a.site.name, {}).setdefault(a.call.step, []).append(entry)
        return None

    interceptor = _Interceptor(pipe, layers, steps, branch, measure)
    with interceptor.installed():
        try:
            yield result
        finally:
            result.steps = sorted({s for per in seen.values() for s in per})
            for name, per in seen.items():
                result.layer[name] = torch.stack([torch.cat([e[0] for e in per[s]]) for s in result.steps])
                result.heads[name] = torch.stack([torch.cat([e[1] for e in per[s]]) for s in result.steps])


@contextlib.contextmanager
def withhold(pipe, prompts, word, layers, steps=None, branch: str = "cond"):
    """Generate with the image queries of ``layers`` unable to attend to ``word``'s tokens (one word, or
    one per prompt; at ``steps``, the ``branch`` rows); ``prompts``: the pipeline's prompts, in order."""
    if not as_list(layers):
        raise ValueError("give at least one layer to withhold the word from")
    keys = _WordKeys(get_adapter(pipe), prompts, word)

    def mask_word(a: AttentionCall):
        rows, img = a.call.rows, a.layout["q_image"]
        q = a.q[rows][:, :, img]
        extra = torch.zeros(len(rows), 1, q.shape[2], a.k.shape[2], dtype=q.dtype, device=q.device)
        for r, cols in enumerate(keys(a)):
            extra[r, ..., cols] = float("-inf")
        if a.mask is not None:
            extra = extra + a._mask_rows(rows)[:, :, img]
        out = a.out.clone()
        out[rows, :, img] = _ORIGINAL_SDPA(q, a.k[rows], a.v[rows], attn_mask=extra, scale=a.scale)
        return out

    with _Interceptor(pipe, layers, steps, branch, mask_word).installed():
        yield


@contextlib.contextmanager
def knock_out(pipe, heads: dict, mode: str = "zero", steps=None, branch: str = "cond"):
    """Generate with each ``{layer: [head, ...]}`` head's text-to-image contribution removed: its image
    queries' reading of every text key is zeroed (``mode='zero'``) or replaced by its mean over the selected
    rows (``'mean'``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not heads:
        raise ValueError("give at least one {layer: [head, ...]} to knock out")
    chosen = {name: [int(h) for h in as_list(hs)] for name, hs in heads.items()}

    def remove(a: AttentionCall):
        rows, img, txt = a.call.rows, a.layout["q_image"], a.layout["k_text"]
        n_heads = a.q.shape[1]
        bad = [h for h in chosen[a.site.name] if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"layer {a.site.name} has heads 0..{n_heads - 1}, not {bad}")
        text = list(range(txt.start or 0, txt.stop if txt.stop is not None else a.k.shape[2]))
        out = a.out.clone()
        for h in chosen[a.site.name]:
            c = a.read(rows, h, [text] * len(rows)).to(out.dtype)
            new = c.mean(0, keepdim=True).expand_as(c) if mode == "mean" else torch.zeros_like(c)
            out[rows, h, img] = out[rows, h, img] - c + new
        return out

    with _Interceptor(pipe, list(chosen), steps, branch, remove).installed():
        yield
