"""Record image-query -> text-key attention probabilities without changing a pipeline's output.

How it works (DESIGN section 3):
- Each selected attention module's *existing* processor is wrapped, per instance; the originals
  go back on exit, also after an exception. Nothing is patched on a class.
- While a wrapped processor runs, its call to ``torch.nn.functional.scaled_dot_product_attention``
  is intercepted (only on that thread, only inside that processor call). The interceptor sees the
  exact q and k the model uses (after qk-norm and RoPE), returns the same output, and computes on
  the side only the columns it needs: p[i, j] = exp(q_i . k_j * scale - lse_i) for image queries i
  and the selected text keys j. The full (image+text)^2 matrix is never built: the row
  log-sum-exp comes from the attention kernel itself when SDPA would run the CPU flash kernel
  (same kernel, so bitwise the same output), otherwise it is computed in query chunks.
- A forward pre-hook on the denoiser tracks the generation, the denoising step (a new timestep
  is a new step; Flux's second, unconditional call at the same timestep is the same step), the
  CFG branch of every batch row and the text length. A wrapper on the pipeline's
  ``encode_prompt`` (instance attribute, removed on exit) captures the prompt of each generation,
  so words can be mapped to token positions with the pipeline's own tokenizers.
- Reduction happens as it goes: only selected rows (CFG branch), tokens, layers and steps are
  kept; heads are averaged unless asked to keep them.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..adapters.base import CROSS, AttentionSite, as_list, ensure_prompts
from .maps import AttentionMaps

_tls = threading.local()  # .capture: the _Capture of the processor call running on this thread
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_install_lock = threading.Lock()
_install_count = 0
_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)


def _intercepting_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    cap = getattr(_tls, "capture", None)
    if cap is None or cap.seen:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    cap.seen = True
    return cap.recorder._attend(cap.site, query, key, value, attn_mask, dropout_p, is_causal, scale, kw)


def _install():
    global _install_count
    with _install_lock:
        if _install_count == 0:
            F.scaled_dot_product_attention = _intercepting_sdpa
        _install_count += 1


def _uninstall():
    global _install_count
    with _install_lock:
        _install_count -= 1
        if _install_count == 0:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA


@dataclass
class _Capture:
    recorder: "Recorder"
    site: AttentionSite
    seen: bool = False


class _RecordingProcessor:
    """Wraps one module's processor. Its call signature mirrors the original's, because diffusers
    filters the keyword arguments it passes by inspecting the processor's signature."""

    def __init__(self, original, site: AttentionSite, recorder: "Recorder"):
        self.original, self.site, self.recorder = original, site, recorder

    def _run(self, attn, *args, **kwargs):
        if not self.recorder._wants_now():
            return self.original(attn, *args, **kwargs)
        previous = getattr(_tls, "capture", None)
        cap = _tls.capture = _Capture(self.recorder, self.site)
        try:
            out = self.original(attn, *args, **kwargs)
        finally:
            _tls.capture = previous
        if not cap.seen:
            raise RuntimeError(
                f"the attention processor {type(self.original).__name__} of layer {self.site.name} did not call "
                "torch.nn.functional.scaled_dot_product_attention, so the recorder cannot see its attention "
                "probabilities (xformers, flash-attn or another custom backend?). Use diffusers' native "
                "backend (e.g. denoiser.set_attention_backend('native')) or the default processors "
                "(denoiser.set_default_attn_processor())."
            )
        return out


_wrapper_classes: dict[type, type] = {}


def _wrap(original, site, recorder):
    cls = type(original)
    if cls not in _wrapper_classes:
        import inspect

        def __call__(self, *args, **kwargs):
            return self._run(*args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _wrapper_classes[cls] = type(f"Recording{cls.__name__}", (_RecordingProcessor,), {"__call__": __call__})
    return _wrapper_classes[cls](original, site, recorder)


@dataclass
class _Generation:
    prompts: list[str] | None
    index: int
    steps_total: int | None
    wanted_steps: set[int] | None  # None: all
    step: int = -1
    last_t: float | None = None
    call_in_step: int = 0
    timesteps: dict = field(default_factory=dict)  # step -> timestep
    batch: int | None = None  # rows per branch
    # per call
    rows: list[int] = field(default_factory=list)  # selected batch rows
    row_branch: list[int] = field(default_factory=list)  # index into recorder.branches
    row_item: list[int] = field(default_factory=list)  # batch item within the branch
    text_len: int = 0
    grid: tuple[int, int] = (0, 0)
    cols: torch.Tensor | None = None  # text positions whose probabilities are computed
    weights: torch.Tensor | None = None  # (rows, targets, cols) 0/1: which positions make each target
    layout: tuple | None = None  # (rows, branches, items, text_len) the targets were computed for
    row_index: object = None  # the selected rows as a slice (a view, no copy) or an index tensor
    store_index: tuple = ()  # (branch, item) index tensors of the selected rows
    data: dict = field(default_factory=dict)  # (layer, step) -> (sum (branch, batch, head, token, n), count (branch, batch))
    mass: dict = field(default_factory=dict)


class Recorder:
    def __init__(
        self,
        pipe,
        words=None,
        tokens=None,
        layers=None,
        steps=None,
        heads: str = "mean",
        branch: str = "cond",
        prompt=None,
        text_mass: bool = True,
        mean_over_steps: bool = False,
        method: str = "auto",
        chunk_size: int = 1024,
    ):
        self.adapter = get_adapter(pipe)
        self.pipe = self.adapter.pipe
        self.words = _word_specs(words)
        self.token_indices = [int(i) for i in as_list(tokens)]
        if not self.words and not self.token_indices:
            raise ValueError("nothing to record: give words=[...] and/or tokens=[...] (text-sequence indices)")
        if heads not in ("mean", "keep"):
            raise ValueError(f"heads must be 'mean' or 'keep', got {heads!r}")
        branches = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}
        if branch not in branches:
            raise ValueError(f"branch must be one of {list(branches)}, got {branch!r}")
        if method not in ("auto", "chunked", "naive"):
            raise ValueError(f"method must be 'auto', 'chunked' or 'naive', got {method!r}")
        self.branches = branches[branch]
        self.sites = self.adapter.select_sites(layers)
        self.steps = None if steps is None else [int(s) for s in as_list(steps)]
        self.heads, self.text_mass, self.mean_over_steps = heads, text_mass, mean_over_steps
        self.method, self.chunk_size = method, chunk_size
        self.fixed_prompts = None if prompt is None else list(ensure_prompts(prompt))
        self.maps = AttentionMaps.empty(self.adapter.family, self.sites, self.branches, heads)
        self._gen: _Generation | None = None
        self._n_gen = 0
        self._pending_prompt = None
        self._prompt_taken = False
        self._handles = []
        self._originals: list[tuple[torch.nn.Module, object]] = []

    # ----- context -----
    def __enter__(self) -> AttentionMaps:
        try:
            for site in self.sites:
                mod = self.adapter.module(site)
                self._originals.append((mod, mod.processor))
                mod.processor = _wrap(mod.processor, site, self)
            self._handles.append(
                self.adapter.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
            )
            if hasattr(self.pipe, "encode_prompt"):
                original = self.pipe.encode_prompt

                def encode_prompt(*args, **kwargs):
                    if not self._prompt_taken:
                        p = kwargs.get("prompt", args[0] if args else None)
                        self._pending_prompt, self._prompt_taken = p, True
                    return original(*args, **kwargs)

                self.pipe.encode_prompt = encode_prompt
            _install()
        except BaseException:
            self._restore(installed=False)
            raise
        return self.maps

    def __exit__(self, *exc):
        self._restore(installed=True)
        self._flush()
        return False

    def _restore(self, installed: bool):
        for mod, proc in reversed(self._originals):
            mod.processor = proc
        self._originals.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.pipe.__dict__.pop("encode_prompt", None)
        if installed:
            _uninstall()

    # ----- generation / step tracking -----
    def _on_denoiser_call(self, module, args, kwargs):
        t = self.adapter.timestep_of(args, kwargs)
        if self._gen is None or self._prompt_taken:
            self._start_generation()
        g = self._gen
        if g.last_t is None or t != g.last_t:
            g.step, g.call_in_step, g.last_t = g.step + 1, 0, t
            g.timesteps[g.step] = t
        else:
            g.call_in_step += 1
        if g.steps_total is not None and g.step >= g.steps_total:
            g.steps_total = None  # more calls than the pipeline announced (a custom loop): stop validating
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        rows_all = x.shape[0]
        branch_of_row = self.adapter.branches(rows_all, g.call_in_step)
        per_branch = sum(1 for b in branch_of_row if b == branch_of_row[-1])
        g.rows, g.row_branch, g.row_item = [], [], []
        seen: dict[str, int] = {}
        for r, b in enumerate(branch_of_row):
            item = seen.get(b, 0)
            seen[b] = item + 1
            if b in self.branches:
                g.rows.append(r)
                g.row_branch.append(self.branches.index(b))
                g.row_item.append(item)
        if g.batch is None:
            g.batch = per_branch
        g.text_len = self.adapter.text_length(kwargs)
        g.grid = self.adapter.image_grid(args, kwargs)
        layout = (tuple(g.rows), tuple(g.row_branch), tuple(g.row_item), g.text_len)
        if layout != g.layout:  # words -> positions once per generation, not at every step
            self._targets_for(g)
            g.layout = layout
            r = g.rows
            contiguous = r and r == list(range(r[0], r[-1] + 1))
            g.row_index = slice(r[0], r[-1] + 1) if contiguous else torch.tensor(r)
            g.store_index = (torch.tensor(g.row_branch), torch.tensor(g.row_item))

    def _start_generation(self):
        self._flush()
        prompts = self.fixed_prompts
        if prompts is None and self._pending_prompt is not None:
            prompts = list(ensure_prompts(self._pending_prompt))
        self._prompt_taken, self._pending_prompt = False, None
        total = self.adapter.num_steps()
        wanted = None
        if self.steps is not None:
            wanted = set()
            for s in self.steps:
                if total is not None and not -total <= s < total:
                    raise IndexError(
                        f"step {s} out of range: this generation has {total} denoising steps (0..{total - 1}; "
                        "negative steps count from the end)"
                    )
                if s < 0 and total is None:
                    raise IndexError(f"step {s}: negative steps need a pipeline call that announces its step count")
                wanted.add(s % total if total else s)
        self._gen = _Generation(prompts, self._n_gen, total, wanted)
        self._n_gen += 1

    def _wants_now(self) -> bool:
        g = self._gen
        return g is not None and bool(g.rows) and (g.wanted_steps is None or g.step in g.wanted_steps)

    def _targets_for(self, g: _Generation):
        """Which text positions make each target token, per selected row (words mapped per prompt)."""
        streams = [s.name for s in self.adapter.streams(g.text_len)]
        labels = [(label, s) for label, _ in self.words for s in streams] + [(f"#{i}", "index") for i in self.token_indices]
        if not self.maps.tokens:
            self.maps.tokens = [{"label": w, "stream": s} for w, s in labels]
        elif [(d["label"], d["stream"]) for d in self.maps.tokens] != labels:
            raise ValueError("the text streams changed between generations; record them in separate contexts")
        positions = []  # per row: list per target
        for item in g.row_item:
            per_target = []
            if self.words:
                if not g.prompts:
                    raise ValueError(
                        "words need the prompt text, but the pipeline was called without one (prompt_embeds?). "
                        "Pass prompt=... to record(), or record token indices with tokens=[...]"
                    )
                n_per = max(1, g.batch // len(g.prompts))
                index = min(item // n_per, len(g.prompts) - 1)
                prompt = g.prompts[index]
                for label, spec in self.words:
                    if isinstance(spec, str):
                        w = spec
                    elif len(spec) != len(g.prompts):
                        raise ValueError(
                            f"words[{label!r}] gives {len(spec)} per-prompt words, but the pipeline was called with "
                            f"{len(g.prompts)} prompts: give one word per prompt"
                        )
                    else:
                        w = spec[index]
                    found = self.adapter.word_positions(prompt, w, g.text_len)
                    per_target += [found.get(s, []) for s in streams]
            for i in self.token_indices:
                if not -g.text_len <= i < g.text_len:
                    raise IndexError(f"token index {i} out of range: the text sequence has {g.text_len} positions")
                per_target.append([i % g.text_len])
            positions.append(per_target)
        cols = sorted({p for row in positions for tgt in row for p in tgt})
        index = {p: c for c, p in enumerate(cols)}
        w = torch.zeros(len(g.rows), len(labels), len(cols))
        for r, row in enumerate(positions):
            for t, tgt in enumerate(row):
                for p in tgt:
                    w[r, t, index[p]] = 1.0
        g.cols, g.weights = torch.tensor(cols, dtype=torch.long), w

    # ----- the attention computation -----
    def _attend(self, site, q, k, v, attn_mask, dropout_p, is_causal, scale, kw):
        fast = (
            self.method == "auto"
            and q.device.type == "cpu"
            and attn_mask is None
            and not kw
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and torch._fused_sdp_choice(q, k, v, None, dropout_p, is_causal, scale=scale, enable_gqa=False) == _FLASH
        )
        lse = None
        if fast:
            # the kernel SDPA itself would run, asked for its row log-sum-exp too
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale
            )[:2]
        else:
            out = _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        if is_causal:
            raise ValueError(f"layer {site.name}: causal attention is not text-to-image attention")
        with torch.no_grad():
            self._record(site, q, k, attn_mask, scale, lse, kw.get("enable_gqa", False))
        return out

    def _record(self, site, q, k, attn_mask, scale, lse, gqa):
        g = self._gen
        img, txt = site.ranges(q.shape[-2], k.shape[-2], g.text_len)
        rows = g.row_index
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qi = q[rows][:, :, img].to(dtype)  # a view when the rows are contiguous (the usual CFG half)
        kk = k[rows].to(dtype)
        if kk.shape[1] != qi.shape[1]:  # grouped-query attention
            kk = kk.repeat_interleave(qi.shape[1] // kk.shape[1], dim=1)
        scale = qi.shape[-1] ** -0.5 if scale is None else scale
        mask = None
        if attn_mask is not None:
            mask = attn_mask.broadcast_to(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])[rows][:, :, img]
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
            mask = mask.to(dtype)
        kt = kk[:, :, txt]
        cols = g.cols
        n = qi.shape[-2]
        if self.method == "naive":
            # what existing tools do: the full softmax over all keys, then the text columns
            logits = qi @ kk.transpose(-1, -2) * scale
            if mask is not None:
                logits = logits + mask
            full = logits.softmax(-1)
            p_txt = full[..., txt]
            sel, mass = p_txt[..., cols], p_txt.sum(-1)
        else:
            if lse is not None:
                lse_img = lse[rows][:, :, img].to(dtype)
            else:  # row log-sum-exp over all keys, query chunk by query chunk
                lse_img = torch.empty(qi.shape[:-1], dtype=dtype)
                for a in range(0, n, self.chunk_size):
                    logits = qi[:, :, a : a + self.chunk_size] @ kk.transpose(-1, -2) * scale
                    if mask is not None:
                        logits = logits + mask[:, :, a : a + self.chunk_size]
                    lse_img[:, :, a : a + self.chunk_size] = logits.logsumexp(-1)
            tmask = mask[..., txt] if mask is not None else None
            logits = qi @ kt[:, :, cols].transpose(-1, -2) * scale
            if tmask is not None:
                logits = logits + tmask[..., cols]
            sel = (logits - lse_img.unsqueeze(-1)).exp()
            mass = None
            if self.text_mass:
                if site.kind == CROSS and mask is None:
                    mass = torch.ones_like(lse_img)  # every key is text
                elif lse is not None and tmask is None:
                    # the same fused kernel gives the log-sum-exp over the text keys alone:
                    # text mass = exp(lse_text - lse_all), with no (image x text) block in memory
                    lse_txt = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qi, kt, kt, 0.0, False, scale=scale)[1]
                    mass = (lse_txt - lse_img).exp()
                else:
                    mass = torch.empty_like(lse_img)
                    for a in range(0, n, self.chunk_size):
                        lg = qi[:, :, a : a + self.chunk_size] @ kt.transpose(-1, -2) * scale
                        if tmask is not None:
                            lg = lg + tmask[:, :, a : a + self.chunk_size]
                        mass[:, :, a : a + self.chunk_size] = (lg - lse_img[:, :, a : a + self.chunk_size, None]).exp().sum(-1)
        maps = torch.einsum("rhnc,rtc->rhtn", sel, g.weights.to(sel.dtype))  # (rows, heads, targets, n)
        if self.heads == "mean":
            maps = maps.mean(1, keepdim=True)
            mass = mass.mean(1, keepdim=True) if mass is not None else None
        self._store(g, site, maps.float().cpu(), None if mass is None else mass.float().cpu())

    def _store(self, g, site, maps, mass):
        step = -1 if self.mean_over_steps else g.step
        key = (site.name, step)
        nb, batch = len(self.branches), g.batch
        if key not in g.data:  # running sums and counts, per (branch, batch item)
            h, t, n = maps.shape[1:]
            g.data[key] = (torch.zeros(nb, batch, h, t, n), torch.zeros(nb, batch))
            if mass is not None:
                g.mass[key] = torch.zeros(nb, batch, h, n)
        total, count = g.data[key]
        br, it = g.store_index
        total[br, it] += maps
        count[br, it] += 1
        if mass is not None:
            g.mass[key][br, it] += mass

    def _flush(self):
        """Hand the finished generation to the AttentionMaps."""
        g = self._gen
        if g is None:
            return
        self._gen = None
        if not g.data:
            return
        self.maps._add_generation(g, self.adapter)


def _word_specs(words) -> list[tuple[str, str | list[str]]]:
    """(label, word or per-prompt words) pairs. A dict gives labelled roles whose word may differ per prompt,
    e.g. {"color": ["red", "blue"]} for the batch ["a red car", "a blue car"]."""
    if isinstance(words, dict):
        out = []
        for label, spec in words.items():
            if not isinstance(spec, str):
                spec = [str(w) for w in spec]
                if not spec:
                    raise ValueError(f"words[{label!r}] is an empty list: give a word, or one word per prompt")
            out.append((str(label), spec))
        return out
    return [(w, w) for w in as_list(words)]


@contextlib.contextmanager
def record(pipe, words=None, tokens=None, layers=None, steps=None, heads="mean", branch="cond", prompt=None, **options):
    """Record image-query -> text-key attention of ``pipe`` while the block runs.

    with record(pipe, words=["red", "car"]) as maps:
        pipe("a red car", ...)
    maps.word_map("red")   # (y, x), mean over layers and steps

    words: words or phrases of the prompt (mapped with the pipeline's tokenizers, sub-word pieces
        summed, one entry per text stream); or a dict {label: word, or one word per prompt} to record
        a role whose word changes across the batch ({"color": ["red", "blue"]}), stored under the label. tokens: indices into the denoiser's text sequence.
    layers: canonical names, glob patterns ('block.*.joint') or indices; default all with text keys.
    steps: step indices (negative from the end); default all. heads: 'mean' or 'keep'.
    branch: 'cond' (default), 'uncond' or 'both'. prompt: the prompt(s) when the pipeline is called
        with prompt_embeds. Options: text_mass (default True), mean_over_steps, method
        ('auto', 'chunked', 'naive'), chunk_size.
    """
    rec = Recorder(pipe, words, tokens, layers, steps, heads, branch, prompt, **options)
    with rec as maps:
        yield maps
