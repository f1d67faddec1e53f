"""CLIP for real images: a zero-shot attribute judge and CLIPScore, both from transformers' CLIPModel.

    clip = Clip("openai/clip-vit-large-patch14")           # a hub id or a local folder
    judge = ClipJudge({"expression": {"smiling": "a photo of a smiling person",
                                      "serious": "a photo of a person with a serious expression"}}, clip)
    judge.scores(images)["expression"]   # (N, 2) probabilities, softmax over the value prompts
    clip_score(clip, images, ["a photo of a smiling woman", ...])

The judge is the real-image stand-in for the toy world's exact judge: it has the same interface
(``attributes``, ``scores``, ``read``, ``readings``, ``score``), so every study takes either.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel


class Clip:
    """A CLIPModel with its tokenizer and image processor, giving unit-norm embeddings."""

    def __init__(self, model="openai/clip-vit-large-patch14", tokenizer=None, processor=None, device=None,
                 dtype=None):
        """model: a hub id, a local folder (``save_pretrained`` layout), or a CLIPModel (then give its
        tokenizer and image processor too)."""
        if isinstance(model, (str, Path)):
            source = str(model)
            try:
                loaded = CLIPModel.from_pretrained(source, torch_dtype=dtype)
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
                processor = processor or CLIPImageProcessor.from_pretrained(source)
            except OSError as e:
                raise FileNotFoundError(
                    f"could not load a CLIP model from {source!r} ({e}). Give a local folder holding a CLIPModel "
                    "with its tokenizer and preprocessor_config.json, or a hub id on a machine that can reach the hub"
                ) from e
            model = loaded
        elif tokenizer is None or processor is None:
            raise ValueError("a CLIPModel object needs its tokenizer and image processor: Clip(model, tokenizer, processor)")
        self.model = model.eval().to(device or "cpu")
        self.tokenizer, self.processor = tokenizer, processor

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def text_embeds(self, texts) -> torch.Tensor:
        """(N, D) unit-norm text embeddings (CLIP's projection of the end-of-text token)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                           attention_mask=enc["attention_mask"].to(self.device))
        out = getattr(out, "pooler_output", out)  # transformers 5 may wrap the features
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def image_embeds(self, images, batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit-norm image embeddings. images: uint8 (N, H, W, 3) / (H, W, 3) arrays or PIL images."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        items = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        outs = []
        for lo in range(0, len(items), batch_size):
            pix = self.processor(images=items[lo:lo + batch_size], return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=pix.to(self.device, self.model.dtype))
            outs.append(torch.nn.functional.normalize(getattr(out, "pooler_output", out).float(), dim=-1))
        return torch.cat(outs) if outs else torch.zeros(0, self.model.config.projection_dim)


def clip_score(clip: Clip, images, texts, scale: float = 100.0) -> np.ndarray:
    """CLIPScore per (image, text) pair: ``scale * max(cos(image, text), 0)`` (Hessel et al. 2021 with
    w = 1; scale 100 as in torchmetrics and the paper's Table 2, where 34.3 means cosine 0.343)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    img = clip.image_embeds(images)
    if len(texts) == 1 and len(img) > 1:
        texts = texts * len(img)
    if len(texts) != len(img):
        raise ValueError(f"{len(img)} images but {len(texts)} texts: give one text per image (or one for all)")
    txt = clip.text_embeds(texts)
    return (scale * (img * txt).sum(-1).clamp(min=0)).cpu().numpy()


class ClipJudge:
    """Zero-shot attribute reader: per attribute, a softmax over its value prompts of CLIP's scaled
    cosine similarities (the model's own logit scale)."""

    def __init__(self, attributes: dict[str, dict[str, str]], clip: Clip | str = "openai/clip-vit-large-patch14"):
        if not attributes:
            raise ValueError("give at least one attribute: {attribute: {value: prompt, ...}}")
        for attr, values in attributes.items():
            if not isinstance(values, dict) or len(values) < 2:
                raise ValueError(f"attribute {attr!r} needs a mapping of at least two values to prompts, got {values!r}")
        self.prompts = {a: dict(v) for a, v in attributes.items()}
        self.clip = clip if isinstance(clip, Clip) else Clip(clip)
        self._text = {a: self.clip.text_embeds(list(v.values())) for a, v in self.prompts.items()}

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        return {a: tuple(v) for a, v in self.prompts.items()}

    def check(self, attribute: str, value: str | None = None) -> None:
        if attribute not in self.prompts:
            raise KeyError(f"the CLIP judge knows the attributes {', '.join(self.prompts)}, not {attribute!r}")
        if value is not None and value not in self.prompts[attribute]:
            raise KeyError(f"unknown {attribute} {value!r}; known: {', '.join(self.prompts[attribute])}")

    @torch.no_grad()
    def scores(self, images) -> dict[str, np.ndarray]:
        img = self.clip.image_embeds(images)
        scale = float(self.clip.model.logit_scale.exp())
        return {a: torch.softmax(scale * img @ t.T, dim=-1).cpu().numpy() for a, t in self._text.items()}

    def score(self, images, attribute: str, value: str) -> np.ndarray:
        self.check(attribute, value)
        return self.scores(images)[attribute][:, list(self.prompts[attribute]).index(value)]

    def read(self, images) -> list[dict[str, str]]:
        return self.readings(images)[0]

    def readings(self, images) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
        """``read`` and ``scores`` from one pass of CLIP over the images."""
        s = self.scores(images)
        names = self.attributes
        n = len(next(iter(s.values())))
        return [{a: names[a][int(np.argmax(s[a][i]))] for a in s} for i in range(n)], s


def edit_probability(clip: Clip, images, source_prompts, edit_prompts) -> np.ndarray:
    """Per image, CLIP's zero-shot probability that it shows its edit prompt rather than its source prompt
    (softmax over the two at CLIP's logit scale): the real-image judge of the graded-edit score."""
    img = clip.image_embeds(images)
    src, tgt = clip.text_embeds(source_prompts), clip.text_embeds(edit_prompts)
    if not (len(img) == len(src) == len(tgt)):
        raise ValueError(f"{len(img)} images, {len(src)} source prompts, {len(tgt)} edit prompts: give one of each per image")
    scale = float(clip.model.logit_scale.exp())
    logits = scale * torch.stack([(img * tgt).sum(-1), (img * src).sum(-1)], -1)
    return torch.softmax(logits, -1)[:, 0].cpu().numpy()
