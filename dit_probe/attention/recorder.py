"""Record image-query -> text-key attention probabilities without changing a pipeline's output.

How it works (docs/design.md, section 3 (the recorder)):
- Each selected attention module's *existing* processor is wrapped, per instance, and swapped in
  with diffusers' ``set_processor``; every undo goes on an ExitStack, so the originals go back on
  exit, also after an exception. Nothing is patched on a class.
- While a wrapped processor runs, its call to ``torch.nn.functional.scaled_dot_product_attention``
  is intercepted (only on that thread, only inside that processor call). The interceptor sees the
  exact q and k the model uses (after qk-norm and RoPE), returns the same output, and computes on
  the side only the columns it needs: p[i, j] = exp(q_i . k_j * scale - lse_i) for image queries i
  and the selected text keys j. The full (image+text)^2 matrix is never built. How the row
  log-sum-exp lse_i is obtained is a strategy chosen once from ``method``: 'auto' takes it from the
  attention kernel itself when SDPA would run the CPU flash kernel (same kernel, so bitwise the
  same output) and otherwise computes it in query chunks, as 'chunked' always does; 'naive' builds
  the full softmax, as existing tools do.
- A forward pre-hook on the denoiser tracks the generation, the denoising step (a new timestep
  is a new step; Flux's second, unconditional call at the same timestep is the same step), the
  CFG branch of every batch row and the text length. A wrapper on the pipeline's
  ``encode_prompt`` (instance attribute, removed on exit) captures the prompt of each generation,
  so words can be mapped to token positions with the pipeline's own tokenizers. What a denoiser
  call's arguments mean is the adapter's business (``dit_probe/adapters``).
- Reduction happens as it goes: only selected rows (CFG branch), tokens, layers and steps are
  kept; heads are averaged unless asked to keep them.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from importlib.metadata import version

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..adapters.base import CROSS, AttentionSite, as_list, check_occurrence, check_relation, ensure_prompts
from .maps import AttentionMaps

_tls = threading.local()  # .capture: the _Capture of the processor call running on this thread
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_install_lock = threading.Lock()
_install_count = 0
_MISSING = object()


# ----- SDPA interception -----
def _intercepting_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    cap = getattr(_tls, "capture", None)
    if cap is None or cap.seen:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    cap.seen = True
    return cap.recorder._attend(cap.site, query, key, value, attn_mask, dropout_p, is_causal, scale, kw)


def _install():
    # counted, so that recorders on several pipelines (or threads) share one interceptor
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
        if previous is not None and previous.site.path == self.site.path and not previous.seen:
            raise RuntimeError(
                f"two attention read-outs or edits are on layer {self.site.name} at once (record, contributions, "
                "withhold, knock_out): each intercepts the layer's attention, so they cannot be nested on one layer; "
                "run them one after another, or on different layers"
            )
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
    if cls not in _wrapper_classes:  # one subclass per processor class, since the signature is per class

        def __call__(self, *args, **kwargs):
            return self._run(*args, **kwargs)

        __call__.__signature__ = inspect.signature(cls.__call__)
        _wrapper_classes[cls] = type(f"Recording{cls.__name__}", (_RecordingProcessor,), {"__call__": __call__})
    return _wrapper_classes[cls](original, site, recorder)


def _put_back(obj, name: str, saved) -> None:
    """Undo an instance attribute set on ``obj``: the saved one back, or none (the class's shows again)."""
    if saved is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, saved)


# ----- the maths of one attention call -----
@dataclass
class _ImageRows:
    """One attention call seen from the selected batch rows' image queries, in the compute dtype
    (float32 for half-precision models, so probabilities of ~1e-5 keep their digits)."""

    q: torch.Tensor  # (rows, heads, n_img, d): image queries
    k: torch.Tensor  # (rows, heads, n_keys, d): all keys, grouped-query heads repeated
    txt: slice  # the text keys within k
    kt: torch.Tensor  # (rows, heads, n_text, d): the text keys
    mask: torch.Tensor | None  # (rows, heads, n_img, n_keys), additive
    tmask: torch.Tensor | None  # the mask's text columns
    scale: float
    kernel_lse: torch.Tensor | None  # (rows, heads, n_img): the row log-sum-exp a fused kernel returned
    lse_source: str | None = None  # 'kernel' (the kernel that made the output) or 'kernel-rerun'

    @classmethod
    def select(cls, site, text_len, rows, q, k, attn_mask, scale, kernel_lse, source=None) -> "_ImageRows":
        img, txt = site.ranges(q.shape[-2], k.shape[-2], text_len)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qi = q[rows][:, :, img].to(dtype)  # a view when the rows are contiguous (the usual CFG half)
        kk = k[rows].to(dtype)
        if kk.shape[1] != qi.shape[1]:  # grouped-query attention, repeated as SDPA's enable_gqa does
            kk = kk.repeat_interleave(qi.shape[1] // kk.shape[1], dim=1)
        mask = None
        if attn_mask is not None:
            mask = attn_mask.broadcast_to(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])[rows][:, :, img]
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
            mask = mask.to(dtype)
        return cls(
            q=qi,
            k=kk,
            txt=txt,
            kt=kk[:, :, txt],
            mask=mask,
            tmask=mask[..., txt] if mask is not None else None,
            scale=qi.shape[-1] ** -0.5 if scale is None else scale,
            kernel_lse=None if kernel_lse is None else kernel_lse[rows][:, :, img].to(dtype),
            lse_source=source,
        )


_SDP = torch.nn.attention.SDPBackend


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _kernel_plan(q, k, v, attn_mask, dropout_p, is_causal, scale, kw) -> tuple[str, int] | None:
    """How this call's row log-sum-exp can come from a fused kernel, with the model's output unchanged:
    ('kernel', backend): SDPA would run a kernel that also returns it (CPU flash; CUDA flash or
    memory-efficient), so that very kernel is run; ('rerun', backend) (CUDA, e.g. cuDNN): SDPA runs as
    it would, and a second fused kernel gives the log-sum-exp. None (masks, dropout, autograd, other
    devices, the CPU math fallback): computed in query chunks. Decided per call."""
    # enable_gqa=False (diffusers' Flux passes it) changes nothing; any other extra keyword might
    if attn_mask is not None or any(key != "enable_gqa" or val for key, val in kw.items()):
        return None
    if dropout_p or is_causal or _needs_grad(q, k, v):
        return None
    choice = torch._fused_sdp_choice(q, k, v, None, dropout_p, is_causal, scale=scale, enable_gqa=False)
    if q.device.type == "cpu":
        return ("kernel", choice) if choice == int(_SDP.FLASH_ATTENTION) else None
    if q.device.type == "cuda":
        direct = choice in (int(_SDP.FLASH_ATTENTION), int(_SDP.EFFICIENT_ATTENTION))
        if direct and q.shape[-1] % 8 == 0:  # SDPA pads other head sizes before the kernel
            return "kernel", choice
        return "rerun", choice
    return None


def _run_kernel(choice: int, q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, row log-sum-exp (batch, heads, queries)) from the kernel SDPA itself would call, with
    the arguments SDPA passes it (no mask, no dropout, not causal)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    elif choice == int(_SDP.FLASH_ATTENTION):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:  # memory-efficient: its log-sum-exp is padded to a multiple of 32 queries
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[-2]]
    return out, lse


def _fused_lse(q, k, scale) -> torch.Tensor | None:
    """The row log-sum-exp of softmax(q k^T * scale) from any fused kernel that takes these tensors
    (its output is not used), or None. Only the log-sum-exp is wanted: no (queries x keys) block."""
    try:
        if q.device.type == "cpu":
            if torch._fused_sdp_choice(q, k, k, None, 0.0, False, scale=scale, enable_gqa=False) == int(_SDP.FLASH_ATTENTION):
                return _run_kernel(int(_SDP.FLASH_ATTENTION), q, k, k, scale)[1]
            return None
        if q.device.type == "cuda" and q.shape[-1] % 8 == 0:
            half = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            return _run_kernel(int(_SDP.FLASH_ATTENTION if half else _SDP.EFFICIENT_ATTENTION), q, k, k, scale)[1]
    except RuntimeError:  # a kernel that refuses these shapes or dtypes: the caller computes it otherwise
        return None
    return None


CHUNK_BYTES = 32 * 2**20  # the chunked path's logits per chunk, unless chunk_size is given


class _Strategy:
    """How the text-key probabilities of the image queries are obtained. One strategy is chosen per
    recording from ``method``; attention calls only ask it."""

    def __init__(self, chunk_size: int | None):
        self.chunk_size = chunk_size

    def _chunk(self, r: "_ImageRows") -> int:
        """Queries per chunk: as given, or as many as keep one chunk's logits within CHUNK_BYTES (small
        blocks stay in cache: at SD3-medium's 4429 keys, 64-query chunks ran 2.4x faster on CPU than 1024)."""
        if self.chunk_size is not None:
            return self.chunk_size
        per_query = r.q.shape[0] * r.q.shape[1] * r.k.shape[-2] * r.q.element_size()
        return max(16, CHUNK_BYTES // per_query)

    def attention(self, q, k, v, attn_mask, dropout_p, is_causal, scale, kw):
        """The model's attention output; the row log-sum-exp from a kernel and where it came from, or None, None."""
        return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw), None, None

    def probs_and_mass(self, r: "_ImageRows", cols: torch.Tensor, want_mass: bool):
        """(p over the text columns ``cols`` (rows, heads, n_img, len(cols)), each query's total text
        probability (rows, heads, n_img) or None, the path taken: 'kernel', 'chunked' or 'naive')."""
        raise NotImplementedError


class _Chunked(_Strategy):
    """method='chunked': one pass over chunks of queries. Each chunk's logits against all keys give
    its row log-sum-exp, its text columns' probabilities and its text mass at once, so at most
    (chunk x keys) logits per row and head exist at a time and no logit is computed twice."""

    def probs_and_mass(self, r, cols, want_mass):
        n, c = r.q.shape[-2], self._chunk(r)
        probs = r.q.new_empty(*r.q.shape[:-1], len(cols))
        mass = r.q.new_empty(r.q.shape[:-1]) if want_mass else None
        text_cols = torch.arange(r.k.shape[-2], device=r.q.device)[r.txt][cols.to(r.q.device)]
        for a in range(0, n, c):
            logits = r.q[:, :, a : a + c] @ r.k.transpose(-1, -2) * r.scale
            if r.mask is not None:
                logits = logits + r.mask[:, :, a : a + c]
            lse = logits.logsumexp(-1, keepdim=True)
            probs[:, :, a : a + c] = (logits[..., text_cols] - lse).exp()
            if want_mass:
                mass[:, :, a : a + c] = (logits[..., r.txt] - lse).exp().sum(-1)
        return probs, mass, "chunked"


class _Kernel(_Chunked):
    """method='auto': when SDPA would run a kernel that returns its row log-sum-exp (CPU flash; CUDA
    flash or memory-efficient), run that kernel directly and keep it (bitwise the same output). On CUDA
    when SDPA picks another kernel (cuDNN), SDPA runs as chosen and a second fused kernel call gives the
    log-sum-exp ('kernel-rerun': one more attention's time, no extra memory to speak of). The text
    probabilities then cost one (image x selected columns) product, and the text mass one more kernel
    call over the text keys alone. Otherwise (masks, autograd) as 'chunked'."""

    def attention(self, q, k, v, attn_mask, dropout_p, is_causal, scale, kw):
        plan = _kernel_plan(q, k, v, attn_mask, dropout_p, is_causal, scale, kw)
        if plan is not None and plan[0] == "kernel":
            out, lse = _run_kernel(plan[1], q, k, v, scale)
            return out, lse, "kernel"
        out = super().attention(q, k, v, attn_mask, dropout_p, is_causal, scale, kw)[0]
        if plan is not None:  # 'rerun': the output as SDPA makes it, the log-sum-exp from a second kernel
            lse = _fused_lse(q, k, scale)
            if lse is not None:
                return out, lse, "kernel-rerun"
        return out, None, None

    def probs_and_mass(self, r, cols, want_mass):
        if r.kernel_lse is None:
            return super().probs_and_mass(r, cols, want_mass)
        lse = r.kernel_lse
        logits = r.q @ r.kt[:, :, cols].transpose(-1, -2) * r.scale
        probs = (logits - lse.unsqueeze(-1)).exp()
        mass = None
        if want_mass:
            # the log-sum-exp over the text keys alone, from a fused kernel: exp(lse_text - lse_all) is
            # the text mass, with no (image x text) block in memory
            text_lse = _fused_lse(r.q, r.kt.contiguous(), r.scale)
            if text_lse is None:
                text_lse = (r.q @ r.kt.transpose(-1, -2) * r.scale).logsumexp(-1)
            mass = (text_lse.to(lse.dtype) - lse).exp()
        return probs, mass, r.lse_source


class _Naive(_Strategy):
    """method='naive': the full softmax over all keys, then its text columns, as existing tools do
    (the benchmarks' baseline)."""

    def probs_and_mass(self, r, cols, want_mass):
        logits = r.q @ r.k.transpose(-1, -2) * r.scale
        if r.mask is not None:
            logits = logits + r.mask
        p_txt = logits.softmax(-1)[..., r.txt]
        return p_txt[..., cols.to(p_txt.device)], p_txt.sum(-1) if want_mass else None, "naive"


_STRATEGIES = {"auto": _Kernel, "chunked": _Chunked, "naive": _Naive}


# ----- which text positions make each target -----
def token_weights(positions: list[list[list[int]]], n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 weights that turn text-key probabilities into target maps.

    positions[row][target]: the text-sequence positions that make the target for that batch row
    (a word's pieces in one stream, or one token index; empty where the word is not in that stream).
    Returns (cols, weights): cols, the sorted positions any target needs (the only text columns whose
    probabilities are computed), and weights (rows, n_targets, len(cols)) with 1 where a position
    belongs to a target, so ``probs[..., cols] @ weights`` sums a split word's pieces. Pure.
    """
    cols = sorted({p for row in positions for tgt in row for p in tgt})
    index = {p: c for c, p in enumerate(cols)}
    w = torch.zeros(len(positions), n_targets, len(cols))
    for r, row in enumerate(positions):
        for t, tgt in enumerate(row):
            for p in tgt:
                w[r, t, index[p]] = 1.0
    return torch.tensor(cols, dtype=torch.long), w


def _select_rows(branch_of_row: list[str], wanted: list[str]) -> tuple[list[int], list[int], list[int]]:
    """The batch rows of a denoiser call in a wanted CFG branch: (row, index into ``wanted``, item
    within its branch) for each."""
    rows, row_branch, row_item = [], [], []
    seen: dict[str, int] = {}
    for r, b in enumerate(branch_of_row):
        item = seen.get(b, 0)
        seen[b] = item + 1
        if b in wanted:
            rows.append(r)
            row_branch.append(wanted.index(b))
            row_item.append(item)
    return rows, row_branch, row_item


def _word_for_prompt(label: str, spec, index: int, n_prompts: int) -> str:
    """The word of target ``label`` in prompt ``index``: one word for all, or one per prompt."""
    if isinstance(spec, str):
        return spec
    if len(spec) != n_prompts:
        raise ValueError(
            f"words[{label!r}] gives {len(spec)} per-prompt words, but the pipeline was called with "
            f"{n_prompts} prompts: give one word per prompt"
        )
    return spec[index]


# ----- the recorder -----
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
    row_index: object = None  # the selected rows as a slice (a view, no copy) or an index tensor
    store_index: tuple = ()  # (branch, item) index tensors of the selected rows
    # (rows, branches, items, text_len) -> (cols, weights, row_index, store_index): Flux alternates two
    # layouts (cond call, uncond call) within a step, so each is worked out once, not at every call
    layouts: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # (layer, step) -> (sum (branch, batch, head, token, n), count (branch, batch))
    mass: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)  # (layer, step) -> (mean, mean text mass or None), stored dtype, CPU
    layer_grids: dict = field(default_factory=dict)  # layer -> (h, w) read from its real input (UNet levels)


DEFAULT_MAX_BYTES = 8 * 2**30  # maps held by one recording (CPU memory), unless record(max_bytes=...) says otherwise


class RecordingTooLarge(MemoryError):
    """A recording whose maps would exceed its memory budget (the message names what would shrink it)."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


@dataclass
class RecordingSize:
    """Bytes of maps one generation adds to a recording, per layer (``record(...).estimate(...)``)."""

    per_layer: dict[str, int]
    heads: str
    steps: int
    dtype: torch.dtype

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())

    def advice(self) -> str:
        """The options that shrink it, with what each would give."""
        ways = []
        if self.heads == "keep":
            ways.append("heads='mean'")
        if self.steps > 1:
            ways.append(f"steps=[...] or mean_over_steps=True (1 of {self.steps} steps: {_gib(self.total // self.steps)})")
        if self.dtype.itemsize > 2:
            ways.append(f"dtype=torch.float16 ({_gib(self.total * 2 // self.dtype.itemsize)})")
        ways.append(f"layers=[...] (the largest layer holds {_gib(max(self.per_layer.values()))})")
        return "To shrink it: " + "; ".join(ways) + "."

    def __str__(self):
        return (f"{_gib(self.total)} per generation over {len(self.per_layer)} layers and {self.steps} recorded "
                f"step(s) (heads {self.heads}, {str(self.dtype).removeprefix('torch.')})")


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
        text_mass: bool = False,
        mean_over_steps: bool = False,
        method: str = "auto",
        chunk_size: int | None = None,
        occurrence: str | int = "first",
        dtype: torch.dtype = torch.float32,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        relation: str = "image->text",
        queries=None,
    ):
        self.adapter = get_adapter(pipe)
        self.adapter.check_recordable()
        self.pipe = self.adapter.pipe
        self.words = _word_specs(words)
        check_occurrence(occurrence)
        self.occurrence = occurrence
        self.token_indices = [int(i) for i in as_list(tokens)]
        check_relation(relation)
        self.relation = relation
        self.query_sets = _query_sets(queries) if relation == "image->image" else []
        if relation == "image->image":
            if self.words or self.token_indices:
                raise ValueError("relation='image->image' records image queries: give queries={name: mask or (y, x)}, "
                                 "not words or tokens")
        elif queries is not None:
            raise ValueError(f"queries= chooses image query sets for relation='image->image'; {relation} uses "
                             "words=/tokens= (the text tokens)")
        elif not self.words and not self.token_indices:
            raise ValueError("nothing to record: give words=[...] and/or tokens=[...] (text-sequence indices)")
        if heads not in ("mean", "keep"):
            raise ValueError(f"heads must be 'mean' or 'keep', got {heads!r}")
        branches = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}
        if branch not in branches:
            raise ValueError(f"branch must be one of {list(branches)}, got {branch!r}")
        if method not in _STRATEGIES:
            raise ValueError(f"method must be 'auto', 'chunked' or 'naive', got {method!r}")
        self.branches = branches[branch]
        self.sites = self.adapter.select_sites(layers, relation)
        self.steps = None if steps is None else [int(s) for s in as_list(steps)]
        # the text mass is the denominator of normalise='text': a property of image queries over text keys
        self.heads, self.text_mass, self.mean_over_steps = heads, text_mass and relation == "image->text", mean_over_steps
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype (the maps' storage dtype) must be torch.float32, float16, bfloat16 or float64, got {dtype}")
        self.method, self.chunk_size, self.dtype = method, chunk_size, dtype
        self.max_bytes = max_bytes
        self._held = 0  # estimated bytes of the generations recorded so far
        self._lse = _STRATEGIES[method](chunk_size)  # chosen once; calls only ask it
        self.fixed_prompts = None if prompt is None else list(ensure_prompts(prompt))
        self.maps = AttentionMaps.empty(self.adapter.family, self.sites, self.branches, heads)
        self.maps.relation = relation
        self.maps.settings = {  # provenance: how these maps were recorded
            "dit_probe": version("dit_probe"), "pipeline": type(self.pipe).__name__, "relation": relation, "heads": heads,
            "branch": branch, "method": method, "dtype": str(dtype).removeprefix("torch."),
            "steps": self.steps, "layers": None if layers is None else [str(x) for x in as_list(layers)],
            "words": {label: spec for label, spec in self.words}, "tokens": self.token_indices,
            "queries": [name for name, _ in self.query_sets], "occurrence": occurrence,
            "mean_over_steps": mean_over_steps, "text_mass": self.text_mass,
        }
        self._query_weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gen: _Generation | None = None
        self._n_gen = 0
        self._pending_prompt = None
        self._prompt_taken = False
        self._undo = contextlib.ExitStack()
        self._spatial: dict[str, tuple[int, int]] = {}  # grid_path -> (H, W) of its latest input

    # ----- context -----
    def __enter__(self) -> AttentionMaps:
        with contextlib.ExitStack() as undo:  # an error part-way undoes what was already done
            for site in self.sites:
                self._swap_processor(undo, site)
            hook = self.adapter.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
            undo.callback(hook.remove)
            for path in dict.fromkeys(s.grid_path for s in self.sites if s.grid_path):
                module = self.adapter.denoiser.get_submodule(path)
                hook = module.register_forward_pre_hook(self._on_grid_input(path), with_kwargs=True)
                undo.callback(hook.remove)
            self._watch_encode_prompt(undo)
            _install()
            undo.callback(_uninstall)
            self._undo = undo.pop_all()  # all in place: the undos now wait for __exit__
        return self.maps

    def __exit__(self, *exc):
        self._undo.close()
        self._flush()
        return False

    def _swap_processor(self, undo: contextlib.ExitStack, site: AttentionSite) -> None:
        # diffusers' public API: set_processor also keeps an nn.Module processor's registration right
        mod = self.adapter.module(site)
        original = mod.processor
        mod.set_processor(_wrap(original, site, self))
        undo.callback(mod.set_processor, original)

    def _watch_encode_prompt(self, undo: contextlib.ExitStack) -> None:
        """Wrap the pipeline's encode_prompt (an instance attribute) to learn each generation's prompt."""
        if not hasattr(self.pipe, "encode_prompt"):
            return
        original = self.pipe.encode_prompt
        saved = self.pipe.__dict__.get("encode_prompt", _MISSING)

        def encode_prompt(*args, **kwargs):
            if not self._prompt_taken:  # the first call of a generation; a later one (Flux: the negative) is not its prompt
                self._pending_prompt, self._prompt_taken = self.adapter.encoded_prompt(args, kwargs), True
            return original(*args, **kwargs)

        self.pipe.encode_prompt = encode_prompt
        undo.callback(_put_back, self.pipe, "encode_prompt", saved)

    # ----- generation / step tracking -----
    def _on_denoiser_call(self, module, args, kwargs):
        self.maps._denoiser_calls = getattr(self.maps, "_denoiser_calls", 0) + 1
        t = self.adapter.timestep_of(args, kwargs)
        if self._gen is None or self._prompt_taken:
            self._start_generation()
        g = self._gen
        self._advance_step(g, t)
        branch_of_row = self.adapter.call_branches(args, kwargs, g.call_in_step)
        if g.batch is None:  # the generation's first call
            g.batch = sum(1 for b in branch_of_row if b == branch_of_row[-1])
            self._check_budget(g, self.adapter.image_grid(args, kwargs), self.adapter.text_length(kwargs))
        g.rows, g.row_branch, g.row_item = _select_rows(branch_of_row, self.branches)
        if not g.rows:  # a call with none of the recorded branches (e.g. SD3's skip-layer guidance call)
            return
        g.text_len = self.adapter.text_length(kwargs)
        g.grid = self.adapter.image_grid(args, kwargs)
        layout = (tuple(g.rows), tuple(g.row_branch), tuple(g.row_item), g.text_len)
        if layout not in g.layouts:  # words -> positions once per layout and generation, not at every step
            g.layouts[layout] = self._layout_targets(g) if self.relation != "image->image" else self._layout_sets(g)
        g.cols, g.weights, g.row_index, g.store_index = g.layouts[layout]

    def _advance_step(self, g: _Generation, t: float) -> None:
        if g.last_t is None or t != g.last_t:
            g.step, g.call_in_step, g.last_t = g.step + 1, 0, t
            g.timesteps[g.step] = t
            self._finalise(g, before_step=g.step)
        else:
            g.call_in_step += 1
        if g.steps_total is not None and g.step >= g.steps_total:
            g.steps_total = None  # more calls than the pipeline announced (a custom loop): stop validating

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

    # ----- memory: estimate and budget -----
    def estimate(self, height: int, width: int, num_inference_steps: int, batch: int = 1,
                 text_len: int | None = None) -> "RecordingSize":
        """What one generation of ``batch`` images (per CFG branch) at height x width pixels will hold.
        ``text_len``: the denoiser's text length (text->text only; default: the pipeline's default)."""
        return self._size(self.adapter.token_grid(height, width), num_inference_steps, batch, text_len)

    def _size(self, grid, num_steps: int, batch: int, text_len: int | None = None) -> "RecordingSize":
        if self.relation == "image->image":
            targets = len(self.query_sets)
        else:
            n_streams = len(self.adapter.streams()) if self.words else 0
            targets = len(self.words) * n_streams + len(self.token_indices)
        if self.relation.endswith("->text") and self.relation != "image->text" and text_len is None:
            text_len = sum(s.length for s in self.adapter.streams())
        steps = 1 if self.mean_over_steps else (len(self.steps) if self.steps is not None else num_steps)
        per_layer = {}
        for site in self.sites:
            h, w = self.adapter.layer_grid(site, grid)
            n = text_len if self.relation == "text->text" else h * w  # the keys a map spans
            heads = self.adapter.module(site).heads if self.heads == "keep" else 1
            values = heads * targets * n + (heads * n if self.text_mass else 0)
            per_layer[site.name] = values * steps * len(self.branches) * batch * self.dtype.itemsize
        return RecordingSize(per_layer, self.heads, steps, self.dtype)

    def _check_budget(self, g: _Generation, grid, text_len: int) -> None:
        """Refuse a generation whose maps would take the recording past ``max_bytes``, before recording it."""
        if self.max_bytes is None or g.steps_total is None:  # a custom loop does not announce its steps
            return
        size = self._size(grid, g.steps_total, g.batch, text_len)
        if self._held + size.total > self.max_bytes:
            raise RecordingTooLarge(
                f"this recording would hold {_gib(self._held + size.total)} of maps ({_gib(size.total)} for this "
                f"generation{'' if not self._held else ', ' + _gib(self._held) + ' before it'}), over max_bytes="
                f"{_gib(self.max_bytes)}. {size.advice()} Or raise the budget: record(..., max_bytes=...) (None: no limit)."
            )
        self._held += size.total

    # ----- targets: words and token indices -> text positions -----
    def _layout_targets(self, g: _Generation):
        """(cols, weights, row_index, store_index) for the current call's rows and text length."""
        # text streams come from the tokenizers, which only words need (a pipeline may have none)
        streams = [s.name for s in self.adapter.streams(g.text_len)] if self.words else []
        labels = self._target_labels(streams)
        positions = [self._row_targets(g, item, streams) for item in g.row_item]
        cols, weights = token_weights(positions, len(labels))
        r = g.rows
        contiguous = r and r == list(range(r[0], r[-1] + 1))
        row_index = slice(r[0], r[-1] + 1) if contiguous else torch.tensor(r)
        return cols, weights, row_index, (torch.tensor(g.row_branch), torch.tensor(g.row_item))

    def _layout_sets(self, g: _Generation):
        """As _layout_targets, for image->image: the targets are the query sets (their weights per grid)."""
        labels = [(name, "image") for name, _ in self.query_sets]
        if not self.maps.tokens:
            self.maps.tokens = [{"label": n, "stream": s} for n, s in labels]
        r = g.rows
        contiguous = r and r == list(range(r[0], r[-1] + 1))
        row_index = slice(r[0], r[-1] + 1) if contiguous else torch.tensor(r)
        return None, None, row_index, (torch.tensor(g.row_branch), torch.tensor(g.row_item))

    def _set_weights(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(query positions, weights (sets, positions)) of the image query sets on a (h, w) token grid:
        a mask is resized by area averaging, a point (y, x) in [0, 1] takes its nearest token; each set's
        weights sum to 1, so its map is the mean over its queries. Cached per grid."""
        if grid not in self._query_weights:
            h, w = grid
            rows = []
            for name, spec in self.query_sets:
                if isinstance(spec, tuple):
                    m = torch.zeros(h, w)
                    m[min(int(spec[0] * h), h - 1), min(int(spec[1] * w), w - 1)] = 1.0
                else:
                    m = F.adaptive_avg_pool2d(spec[None, None], (h, w))[0, 0]
                if m.sum() <= 0:
                    raise ValueError(f"query set {name!r} covers no image token on a {h}x{w} layer grid: enlarge its mask")
                rows.append((m / m.sum()).flatten())
            weights = torch.stack(rows)
            positions = weights.sum(0).nonzero().flatten()
            self._query_weights[grid] = (positions, weights[:, positions])
        return self._query_weights[grid]

    def _target_labels(self, streams: list[str]) -> list[tuple[str, str]]:
        """(label, stream) of each target: every word once per text stream, then the token indices."""
        labels = [(label, s) for label, _ in self.words for s in streams] + [(f"#{i}", "index") for i in self.token_indices]
        if not self.maps.tokens:
            self.maps.tokens = [{"label": w, "stream": s} for w, s in labels]
        elif [(d["label"], d["stream"]) for d in self.maps.tokens] != labels:
            raise ValueError("the text streams changed between generations; record them in separate contexts")
        return labels

    def _row_targets(self, g: _Generation, item: int, streams: list[str]) -> list[list[int]]:
        """The text positions of each target for batch item ``item`` (words mapped in its own prompt)."""
        targets = []
        if self.words:
            if not g.prompts:
                raise ValueError(
                    "words need the prompt text, but the pipeline was called without one (prompt_embeds?). "
                    "Pass prompt=... to record(), or record token indices with tokens=[...]"
                )
            n_per = max(1, g.batch // len(g.prompts))  # num_images_per_prompt > 1 repeats each prompt
            index = min(item // n_per, len(g.prompts) - 1)
            for label, spec in self.words:
                word = _word_for_prompt(label, spec, index, len(g.prompts))
                found = self.adapter.word_positions(g.prompts[index], word, g.text_len, self.occurrence)
                targets += [found.get(s, []) for s in streams]
        for i in self.token_indices:
            if not -g.text_len <= i < g.text_len:
                raise IndexError(f"token index {i} out of range: the text sequence has {g.text_len} positions")
            targets.append([i % g.text_len])
        return targets

    # ----- the attention computation -----
    def _on_grid_input(self, path: str):
        """A pre-hook that notes the spatial size (H, W) of a module's 4D input: a UNet level's real grid,
        which its token count alone cannot give (downsampling rounds odd sizes up)."""
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if x is not None and x.ndim == 4:
                self._spatial[path] = (int(x.shape[-2]), int(x.shape[-1]))
        return hook

    def _attend(self, site, q, k, v, attn_mask, dropout_p, is_causal, scale, kw):
        if is_causal:
            raise ValueError(f"layer {site.name}: causal attention is not text-to-image attention")
        out, kernel_lse, source = self._lse.attention(q, k, v, attn_mask, dropout_p, is_causal, scale, kw)
        with torch.no_grad():
            self._record(site, q, k, attn_mask, scale, kernel_lse, source)
        return out

    def _record(self, site, q, k, attn_mask, scale, kernel_lse, source):
        g = self._gen
        if not g.rows:
            return
        if self.relation != "image->text":
            return self._record_relation(site, q, k, attn_mask, scale, kernel_lse, source)
        r = _ImageRows.select(site, g.text_len, g.row_index, q, k, attn_mask, scale, kernel_lse, source)
        every_key_is_text = site.kind == CROSS and r.mask is None
        probs, mass, path = self._lse.probs_and_mass(r, g.cols, self.text_mass and not every_key_is_text)
        taken = self.maps.paths.setdefault(site.name, {})
        taken[path] = taken.get(path, 0) + 1
        if self.text_mass and every_key_is_text:
            mass = probs.new_ones(probs.shape[:-1])
        maps = torch.einsum("rhnc,rtc->rhtn", probs, g.weights.to(probs.device, probs.dtype))  # (rows, heads, targets, n)
        if self.heads == "mean":
            maps = maps.mean(1, keepdim=True)
            mass = mass.mean(1, keepdim=True) if mass is not None else None
        self._store(g, site, maps.float(), None if mass is None else mass.float())

    def _record_relation(self, site, q, k, attn_mask, scale, kernel_lse, source):
        """text->image, text->text, image->image: the selected queries' probabilities over the relation's
        keys, p = exp(q.k * scale - lse), reduced over each target's queries (their mean) as it goes, in
        chunks of queries. The row log-sum-exp comes from the kernel when it gave one, else from chunks."""
        g = self._gen
        lay = site.layout(q.shape[-2], k.shape[-2], g.text_len)
        q_side, k_side = self.relation.split("->")
        keys = lay["k_" + k_side]
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        if q_side == "text":
            qpos = g.cols.to(q.device) + lay["q_text"].start
            w = g.weights / g.weights.sum(-1, keepdim=True).clamp(min=1)  # a word's pieces as queries: their mean
        else:
            grid = self._spatial[site.grid_path] if site.grid_path else g.grid
            positions, set_w = self._set_weights(grid)
            qpos = positions.to(q.device) + lay["q_image"].start
            w = set_w.expand(len(g.rows), *set_w.shape)
        w = w.to(q.device, dtype)
        kk = k[g.row_index].to(dtype)
        if kk.shape[1] != q.shape[1]:  # grouped-query attention, repeated as SDPA's enable_gqa does
            kk = kk.repeat_interleave(q.shape[1] // kk.shape[1], dim=1)
        mask = None
        if attn_mask is not None:
            mask = attn_mask.broadcast_to(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])[g.row_index]
            if mask.dtype == torch.bool:
                mask = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
            mask = mask.to(dtype)
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        out = q.new_zeros(len(g.rows), q.shape[1], w.shape[1], keys.stop - keys.start, dtype=dtype)
        per_query = len(g.rows) * q.shape[1] * k.shape[-2] * torch.finfo(dtype).bits // 8
        c = self.chunk_size or max(16, CHUNK_BYTES // per_query)
        for a in range(0, len(qpos), c):
            idx = qpos[a : a + c]
            qq = q[g.row_index][:, :, idx].to(dtype)
            if kernel_lse is not None:
                lse = kernel_lse[g.row_index][:, :, idx].to(dtype)
            else:
                logits = qq @ kk.transpose(-1, -2) * sc
                if mask is not None:
                    logits = logits + mask[:, :, idx]
                lse = logits.logsumexp(-1)
            logits = qq @ kk[:, :, keys].transpose(-1, -2) * sc
            if mask is not None:
                logits = logits + mask[:, :, idx][..., keys]
            p = (logits - lse.unsqueeze(-1)).exp()  # (rows, heads, chunk, keys)
            out += torch.einsum("rhqk,rtq->rhtk", p, w[:, :, a : a + c])
        taken = self.maps.paths.setdefault(site.name, {})
        path = source if kernel_lse is not None else "chunked"
        taken[path] = taken.get(path, 0) + 1
        if k_side == "text":  # maps over the text positions: a 1 x text_len "grid"
            g.layer_grids[site.name] = (1, keys.stop - keys.start)
        if self.heads == "mean":
            out = out.mean(1, keepdim=True)
        self._store(g, site, out.float(), None)

    def _store(self, g, site, maps, mass):
        step = -1 if self.mean_over_steps else g.step
        key = (site.name, step)
        nb, batch = len(self.branches), g.batch
        if site.grid_path and site.name not in g.layer_grids:
            g.layer_grids[site.name] = self._spatial[site.grid_path]
        if key not in g.data:  # float32 running sums and counts per (branch, batch item), on the model's device
            h, t, n = maps.shape[1:]
            g.data[key] = (maps.new_zeros(nb, batch, h, t, n), torch.zeros(nb, batch))
            if mass is not None:
                g.mass[key] = maps.new_zeros(nb, batch, h, n)
        total, count = g.data[key]
        br, it = g.store_index
        total[br.to(total.device), it.to(total.device)] += maps
        count[br, it] += 1
        if mass is not None:
            g.mass[key][br.to(total.device), it.to(total.device)] += mass

    def _finalise(self, g, before_step: int | None = None) -> None:
        """Turn running sums into means, cast to the storage dtype, on the CPU: those of steps before
        ``before_step`` (finished: a step's calls are done when the next step starts), or all. So at
        most one step's float32 sums exist at a time, unless mean_over_steps."""
        for key in [k for k in g.data if before_step is None or 0 <= k[1] < before_step]:
            total, count = g.data.pop(key)
            denom = count.clone()
            denom[denom == 0] = float("nan")  # a row never seen in this branch: NaN, not zero
            denom = denom.to(total.device)
            data = (total / denom[:, :, None, None, None]).to("cpu", self.dtype)
            mass = g.mass.pop(key, None)
            mass = None if mass is None else (mass / denom[:, :, None, None]).to("cpu", self.dtype)
            g.final[key] = (data, mass)

    def _flush(self):
        """Hand the finished generation to the AttentionMaps."""
        g = self._gen
        if g is None:
            return
        self._gen = None
        self._finalise(g)
        if g.final:
            self.maps._add_generation(g, self.adapter)

    @property
    def paths(self) -> dict[str, int]:
        """How many attention calls each path served, over all layers (per layer: ``maps.paths``)."""
        out: dict[str, int] = {}
        for taken in self.maps.paths.values():
            for path, n in taken.items():
                out[path] = out.get(path, 0) + n
        return out


def _query_sets(queries) -> list[tuple[str, object]]:
    """[(name, mask (h, w) float tensor, or point (y, x) in [0, 1])] from ``queries``: a dict of such, or
    one mask / point (named 'queries')."""
    if queries is None:
        raise ValueError("relation='image->image' needs queries=: {name: a 2D mask (any size, resized to each "
                         "layer's grid) or a point (y, x) as fractions of the height and width}")
    if not isinstance(queries, dict):
        queries = {"queries": queries}
    out = []
    for name, spec in queries.items():
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
            y, x = float(spec[0]), float(spec[1])
            if not (0 <= y <= 1 and 0 <= x <= 1):
                raise ValueError(f"query point {name!r} = {spec}: give (y, x) as fractions of height and width, in [0, 1]")
            out.append((str(name), (y, x)))
            continue
        try:
            mask = torch.as_tensor(spec, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            mask = None
        if mask is None or mask.ndim != 2 or mask.numel() == 0:
            got = f"shape {tuple(mask.shape)}" if mask is not None else type(spec).__name__
            raise ValueError(f"query set {name!r}: give a 2D (height, width) mask or a point (y, x) in [0, 1]; got {got}")
        if mask.ndim != 2 or mask.numel() == 0:
            raise ValueError(f"query set {name!r}: a mask must be a 2D (height, width) array, got shape {tuple(mask.shape)}")
        if not torch.isfinite(mask).all() or (mask < 0).any() or mask.sum() <= 0:
            raise ValueError(f"query set {name!r}: the mask must be non-negative and select at least one pixel")
        out.append((str(name), mask))
    return out


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
        with prompt_embeds. Options: text_mass (default False; the denominator of maps' normalise='text',
        one more attention over the text keys per layer), mean_over_steps, method
        ('auto', 'chunked', 'naive'), chunk_size (queries per chunk of the chunked path; default: as many
        as keep a chunk's logits within 32 MiB), occurrence: which occurrence of a word that appears
        more than once is recorded: 'first' (the default), 'all' (their maps summed) or k (the k-th, from 1).
    Relations: relation='image->text' (the default: each word's map over the image), 'text->image' (the
        word's tokens as queries: where they look in the image; joint attention only, a UNet's text has no
        queries), 'text->text' (a word's attention over the text positions) or 'image->image' with
        queries={name: a 2D mask (any size; resized to each layer's grid) or a point (y, x) in [0, 1]}
        (each set's mean attention over the image; also UNet self-attention and SD3.5's image-only
        attention). No (queries x keys) matrix is kept: queries are reduced as they are computed.
    Memory: dtype, the maps' storage dtype (default torch.float32; float16 or bfloat16 halve it; values
        are computed and summed in float32 whatever the model's dtype), and max_bytes, the budget of maps
        this recording may hold (default 8 GiB; None: no limit): a generation that would exceed it is
        refused before it runs, naming the options that shrink it. ``estimate_recording`` says the size
        beforehand.
    """
    rec = Recorder(pipe, words, tokens, layers, steps, heads, branch, prompt, **options)
    with rec as maps:
        yield maps


def estimate_recording(pipe, height: int, width: int, num_inference_steps: int, batch: int = 1, words=None, tokens=None,
                       layers=None, steps=None, heads="mean", branch="cond", text_len=None, **options) -> RecordingSize:
    """Bytes of maps that ``record(pipe, words, tokens, layers, steps, heads, branch, **options)`` will
    hold for one generation of ``batch`` images per prompt branch at height x width pixels, per layer
    (exact: the recorder stores these arrays). Nothing is installed on ``pipe``."""
    rec = Recorder(pipe, words, tokens, layers, steps, heads, branch, **options)
    return rec.estimate(height, width, num_inference_steps, batch, text_len)
