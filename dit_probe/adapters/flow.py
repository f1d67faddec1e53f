"""Flow-matching maths shared by the SD3 and Flux adapters (docs/design.md, section 2).

z_s = (1 - s) * x0 + s * eps, the model predicts v = eps - x0, with s = sigma = t / 1000.
"""

from __future__ import annotations

import torch


class FlowMatchingMaths:
    def sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.pipe.scheduler.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        s = self.sigma(t).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def to_x0(self, v: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        return z - self.sigma(t).to(z.dtype) * v

    def to_eps(self, v: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        return z + (1 - self.sigma(t).to(z.dtype)) * v

    def to_v(self, x0: torch.Tensor, eps: torch.Tensor, t=None) -> torch.Tensor:
        return eps - x0

    def log_snr(self, t) -> torch.Tensor:
        s = self.sigma(t)
        return 2 * torch.log((1 - s) / s)

    def resolution_shift(self, image_seq_len: int) -> float:
        """Flux's mu: the timestep shift grows linearly with the image token count, from base_shift at
        base_image_seq_len to max_shift at max_image_seq_len (as FluxPipeline computes it; importing its
        helper would load every diffusers pipeline module at ``import dit_probe``)."""
        c = self.pipe.scheduler.config
        lo, hi = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        b0, b1 = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        return b0 + (b1 - b0) * (image_seq_len - lo) / (hi - lo)

    @staticmethod
    def first_step(num_steps: int, strength: float) -> int:
        """As the SD3 and Flux Img2Img pipelines: int(n - n s), so 25 steps at 0.75 denoise 19 steps."""
        return int(max(num_steps - num_steps * strength, 0))

    def step(self, v: torch.Tensor, t, z: torch.Tensor) -> torch.Tensor:
        return self.pipe.scheduler.step(v, t, z, return_dict=False)[0]

    def next_signal_scale(self, t) -> float:
        """The weight of x0 in the latent that the step from ``t`` lands on: 1 - sigma', from the scheduler's
        own sigmas (an Euler step is z' = (1 - sigma') x0 + sigma' eps with x0, eps predicted at t)."""
        sched = self.pipe.scheduler
        i = sched.index_for_timestep(torch.as_tensor(t, device=sched.timesteps.device))
        return float(1 - sched.sigmas[i + 1])
