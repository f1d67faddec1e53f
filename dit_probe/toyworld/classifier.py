"""A differentiable attribute classifier for toy renders: the attribute loss of learned edits (Asyrp's
Δh, and other optimised edits), never the judge that scores them.

The judge reads colour and size by pixel rules and shape with a CNN over a colour-free mask; this
classifier is a different instrument: one small CNN over RGB pixels in [-1, 1] with a head per
attribute, trained on augmented renders (seeds from 20_000_000 on: disjoint from the judge's training
renders and from every evaluation seed). Its gradients can therefore steer an edit without the edit being
scored by the function it optimised. Shipped as ``attribute_classifier.safetensors``;
``python -m dit_probe.toyworld.classifier`` retrains it (about two minutes on two CPU cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .judge import _augment
from .world import ATTRIBUTES, IMAGE_SIZE, render_many, scenes

WEIGHTS = Path(__file__).with_name("attribute_classifier.safetensors")
TRAIN_SEED = 20_000_000


class AttributeNet(nn.Module):
    """RGB (B, 3, H, W) in [-1, 1] (area-resized to 32 x 32) -> {attribute: logits over its values}."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 96, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({a: nn.Linear(96, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x):
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # a real model's image of a toy scene: read at 32 x 32
            x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        f = self.trunk(x)
        return {a: head(f) for a, head in self.heads.items()}

    def loss(self, x, attribute: str, value: str) -> torch.Tensor:
        """Cross-entropy of every image in ``x`` against ``value`` of ``attribute``: what an edit towards
        that value minimises."""
        target = torch.full((len(x),), ATTRIBUTES[attribute].index(value), device=x.device)
        return nn.functional.cross_entropy(self(x)[attribute], target)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 / float 0..255 (N, H, W, 3) -> (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def load_classifier(weights: str | Path = WEIGHTS) -> AttributeNet:
    if not Path(weights).exists():
        raise FileNotFoundError(f"attribute classifier weights not found at {weights}: run "
                                "`python -m dit_probe.toyworld.classifier` to train them (about two minutes)")
    net = AttributeNet()
    net.load_state_dict(load_file(str(weights)))
    return net.eval().requires_grad_(False)


def train_classifier(steps: int = 1200, batch: int = 128, seed: int = 0, out: Path | None = WEIGHTS,
                     log=print) -> AttributeNet:
    """Train on augmented renders (blur, colour shift, pixel noise: generated images are imperfect)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        items = scenes(batch, seed=TRAIN_SEED + seed * 100_000 + step)
        logits = net(pixels(_augment(render_many(items), rng)))
        loss = sum(nn.functional.cross_entropy(logits[a], torch.tensor([values.index(getattr(s, a)) for s in items]))
                   for a, values in ATTRIBUTES.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"attribute classifier step {step}/{steps} loss {loss.item():.4f}")
    net.eval().requires_grad_(False)
    if out is not None:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return net


@torch.no_grad()
def accuracy(net: AttributeNet, images: np.ndarray, labels: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy of ``net`` on uint8 images with their label dicts."""
    logits = net(pixels(images))
    return {a: float(np.mean([values[i] == lab[a] for i, lab in zip(logits[a].argmax(1).tolist(), labels)]))
            for a, values in ATTRIBUTES.items()}


if __name__ == "__main__":
    net = train_classifier()
    held = scenes(1000, seed=TRAIN_SEED - 1)  # outside the training range
    print(accuracy(net, render_many(held), [s.attributes for s in held]))
