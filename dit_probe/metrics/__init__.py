"""Image metrics (paper Table 2). Issue 7 extends this with SSIM, LPIPS and CLIPScore."""

from .image import psnr

__all__ = ["psnr"]
