"""LPIPS (Zhang et al. 2018), AlexNet variant, without torchvision in the install.

The metric: both images through AlexNet's five ReLU stages; each stage's features unit-normalised
over channels; squared differences weighted per channel by LPIPS' learned linear layers, averaged
over space, and summed over stages. The linear-layer weights ship with torchmetrics
(``lpips_models/alex.pth``). The AlexNet backbone (ImageNet weights) comes from, in order:

- ``backbone=PATH``: a state dict of torchvision's ``alexnet`` (safetensors or .pth; keys
  ``features.N.weight`` / ``features.N.bias``; the classifier keys are ignored);
- ``backbone="torchvision"`` (the default): torchvision's pretrained AlexNet, when torchvision imports;
- otherwise a clear error. ``backbone="random"`` gives a seeded random backbone **for tests only**
  (the distances are then not LPIPS); it warns.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torchmetrics.functional.image.lpips as tm_lpips
from safetensors.torch import load_file
from torch import nn

CHANNELS = (64, 192, 384, 256, 256)
# torchvision's ImageNet normalisation in LPIPS' [-1, 1] convention
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional part with torchvision's layer indices (so its state dict loads as is)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.MaxPool2d(3, 2),
    )  # fmt: skip


STAGES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # the five ReLU outputs LPIPS compares


def _linear_weights() -> dict[str, torch.Tensor]:
    path = Path(tm_lpips.__file__).with_name("lpips_models") / "alex.pth"
    if not path.exists():
        raise FileNotFoundError(f"LPIPS linear-layer weights not found at {path}: reinstall torchmetrics (>= 1.4)")
    state = torch.load(path, map_location="cpu", weights_only=True)  # a plain tensor dict
    return {f"{k.split('.')[0][3:]}": v for k, v in state.items()}  # 'lin0.model.1.weight' -> '0'


def _backbone_state(backbone) -> dict[str, torch.Tensor]:
    if backbone == "torchvision":
        try:  # optional: the core install has no torchvision
            import torchvision
        except Exception as e:  # not installed, or built for another torch
            raise RuntimeError(
                "LPIPS needs ImageNet AlexNet weights and torchvision does not import here "
                f"({type(e).__name__}: {e}). Give backbone=PATH: a torchvision alexnet state dict "
                "(e.g. alexnet-owt-7be5be79.pth, or the same converted to safetensors)"
            ) from None
        model = torchvision.models.alexnet(weights=torchvision.models.AlexNet_Weights.DEFAULT)
        return model.state_dict()
    path = Path(backbone)
    if not path.exists():
        raise FileNotFoundError(f"AlexNet weights {path} do not exist: give a torchvision alexnet state dict file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    def __init__(self, backbone="torchvision", seed: int = 0):
        super().__init__()
        self.features = alexnet_features()
        if backbone == "random":
            warnings.warn("LPIPS with a random AlexNet backbone: for tests only, the distances are not LPIPS",
                          stacklevel=2)
            torch.manual_seed(seed)
            self.features = alexnet_features()
        else:
            state = _backbone_state(backbone)
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            missing = self.features.load_state_dict(state, strict=False).missing_keys
            if missing:
                missing = ["features." + k for k in missing]
                raise ValueError(f"the AlexNet weights lack {missing}: expected torchvision alexnet keys "
                                 "features.0.weight ... features.10.bias")
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        for k, w in _linear_weights().items():
            self.lins[int(k)].weight.data.copy_(w)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _stages(self, x):
        h, out = (x - self.shift) / self.scale, []
        for lo, hi in STAGES:
            for layer in self.features[lo:hi]:
                h = layer(h)
            out.append(h / torch.sqrt((h**2).sum(1, keepdim=True) + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N,) distances."""
        fa, fb = self._stages(a), self._stages(b)
        return sum(lin((x - y) ** 2).mean((1, 2, 3)) for lin, x, y in zip(self.lins, fa, fb))

    def distance(self, a, b, mask=None) -> np.ndarray:
        """LPIPS per image pair of uint8 (N, H, W, 3) / (H, W, 3) arrays. With a mask (True = counts), pixels
        outside it are set to black in both images first (the usual masked background score)."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs images of the same shape, got {a.shape} and {b.shape}")
        single = a.ndim == 3
        a, b = (a[None], b[None]) if single else (a, b)
        ta = torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        tb = torch.from_numpy(b.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
        if mask is not None:
            m = torch.from_numpy(np.broadcast_to(np.asarray(mask, bool), a.shape[:3]).copy())[:, None]
            ta, tb = torch.where(m, ta, -1.0), torch.where(m, tb, -1.0)
        out = self(ta.to(self.shift.device), tb.to(self.shift.device)).cpu().numpy()
        return out[0] if single else out
