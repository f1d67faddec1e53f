"""An independent, obviously correct reference for recorded attention probabilities.

It captures each attention module's *inputs* with forward pre-hooks and recomputes q and k from
the module's own weights (linear layers, RMS-norm written out by hand, RoPE written out by hand),
builds the full softmax over all keys, and takes the image-query x text-key block. It shares no
code with the recorder.
"""

from __future__ import annotations

import torch


def _heads(x, n_heads):
    b, n, c = x.shape
    return x.view(b, n, n_heads, c // n_heads).transpose(1, 2)  # (b, h, n, d)


def _rms(x, norm):
    if norm is None:
        return x
    w = norm.weight
    eps = getattr(norm, "eps", 1e-6)
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(x.dtype) if w is not None else y.to(x.dtype)


def _rope(x, cos_sin):
    """Flux rotary embedding on x (b, h, n, d); cos, sin (n, d); pairs (x0, x1) rotate together."""
    cos, sin = cos_sin
    cos, sin = cos[None, None].to(x.dtype), sin[None, None].to(x.dtype)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _full_softmax(kind, attn, args, kwargs, text_len, dtype=None):
    """The full (b, h, queries, keys) softmax of one attention call, and where image and text sit:
    {"q_image", "q_text", "k_image", "k_text"} slices (None where a side has none)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    h = attn.heads
    if kind == "cross":  # UNet / PixArt attn2: queries image, keys text
        q, k = _heads(attn.to_q(hs), h).to(dtype or hs.dtype), _heads(attn.to_k(ehs), h).to(dtype or hs.dtype)
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        mask = kwargs.get("attention_mask")  # PixArt: an additive bias (b, 1, keys) on padded text tokens
        if mask is not None:
            logits = logits + mask.to(logits.dtype)[:, None]
        p = logits.softmax(-1)
        return p, {"q_image": slice(None), "q_text": None, "k_image": None, "k_text": slice(None)}
    q = _rms(_heads(attn.to_q(hs), h), attn.norm_q)
    k = _rms(_heads(attn.to_k(hs), h), attn.norm_k)
    if kind in ("sd3", "flux-double"):
        eq = _rms(_heads(attn.add_q_proj(ehs), h), attn.norm_added_q)
        ek = _rms(_heads(attn.add_k_proj(ehs), h), attn.norm_added_k)
        if kind == "sd3":  # [image | text], no RoPE
            q, k = torch.cat([q, eq], 2), torch.cat([k, ek], 2)
        else:  # Flux: [text | image]
            q, k = torch.cat([eq, q], 2), torch.cat([ek, k], 2)
    if kind.startswith("flux"):
        rope = kwargs.get("image_rotary_emb", args[3] if len(args) > 3 else None)
        q, k = _rope(q, rope), _rope(k, rope)
    q, k = q.to(dtype or q.dtype), k.to(dtype or k.dtype)
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # the full matrix: fine for a reference
    n = p.shape[-1]
    if kind == "self":  # image-only self-attention (UNet attn1, SD3.5 attn2)
        img, txt = slice(None), None
    elif kind == "sd3":
        img, txt = slice(0, n - text_len), slice(n - text_len, n)
    else:
        img, txt = slice(text_len, n), slice(0, text_len)
    return p, {"q_image": img, "q_text": txt, "k_image": img, "k_text": txt}


def reference_probs(kind, attn, args, kwargs, text_len, dtype=None):
    """(b, h, n_img, n_text) probabilities for one attention call; the softmax in ``dtype`` (default:
    the model's) from q and k computed in the model's dtype."""
    return reference_block(kind, attn, args, kwargs, text_len, "image->text", dtype)


def reference_block(kind, attn, args, kwargs, text_len, relation, dtype=None):
    """(b, h, queries, keys) of a relation 'image->text', 'text->image', 'image->image' or 'text->text':
    the full softmax's block of those queries and keys."""
    p, lay = _full_softmax(kind, attn, args, kwargs, text_len, dtype)
    qs, ks = relation.split("->")
    return p[:, :, lay["q_" + qs]][..., lay["k_" + ks]]


class InputCapture:
    """Forward pre-hooks on attention modules (and the denoiser, for the text length)."""

    def __init__(self, denoiser, paths):
        self.calls = {p: [] for p in paths}
        self.text_lens = []
        self.handles = [denoiser.register_forward_pre_hook(self._den, with_kwargs=True)]
        for p in paths:
            self.handles.append(denoiser.get_submodule(p).register_forward_pre_hook(self._hook(p), with_kwargs=True))

    def _den(self, mod, args, kwargs):
        self.text_lens.append(kwargs["encoder_hidden_states"].shape[1])

    def _hook(self, path):
        def hook(mod, args, kwargs):
            self.calls[path].append((args, dict(kwargs), self.text_lens[-1]))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def reference_values(kind, attn, args, kwargs):
    """(b, h, keys, d) values of one attention call, keys ordered as ``_full_softmax`` orders them."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    h = attn.heads
    if kind == "cross":
        return _heads(attn.to_v(ehs), h)
    v = _heads(attn.to_v(hs), h)
    if kind == "sd3":
        return torch.cat([v, _heads(attn.add_v_proj(ehs), h)], 2)
    if kind == "flux-double":
        return torch.cat([_heads(attn.add_v_proj(ehs), h), v], 2)
    return v  # image-only self-attention, Flux single blocks ([text | image] is the module's input)


def reference_call(kind, attn, args, kwargs, text_len):
    """Float64 full softmax, values and layout of one attention call."""
    p, lay = _full_softmax(kind, attn, args, kwargs, text_len, torch.float64)
    return p, reference_values(kind, attn, args, kwargs).double(), lay
