"""Image metrics (paper Table 2) and the SDE disentanglement metric (paper Eq. 2)."""

from .image import psnr, ssim

__all__ = ["psnr", "ssim"]
