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


def reference_probs(kind, attn, args, kwargs, text_len, dtype=None):
    """(b, h, n_img, n_text) probabilities for one attention call; the softmax in ``dtype`` (default:
    the model's) from q and k computed in the model's dtype."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    h = attn.heads
    if kind == "cross":  # UNet attn2: queries image, keys text
        q, k = _heads(attn.to_q(hs), h).to(dtype or hs.dtype), _heads(attn.to_k(ehs), h).to(dtype or hs.dtype)
        return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
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
    if kind == "sd3":
        return p[:, :, : n - text_len, n - text_len :]
    return p[:, :, text_len:, :text_len]


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
