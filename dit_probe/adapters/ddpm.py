"""The maths of DDPM-family schedules (SD2.x / SD1.x UNets, PixArt): z = sqrt(a) x0 + sqrt(1 - a) eps, with
alpha-bar from the scheduler, eps or v prediction. Shared by the adapters whose denoisers use them."""

from __future__ import annotations

import torch


class DDPMMaths:
    def _alpha(self, t, like):
        ac = self.pipe.scheduler.alphas_cumprod
        a = ac[torch.as_tensor(t).long().cpu()].to(like.dtype)
        return a.sqrt(), (1 - a).sqrt()

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.prediction_type

    def add_noise(self, x0, noise, t):
        sa, sb = self._alpha(t, x0)
        return sa * x0 + sb * noise

    def to_x0(self, out, z, t):
        sa, sb = self._alpha(t, z)
        if self.prediction_type == "v_prediction":
            return sa * z - sb * out
        return (z - sb * out) / sa

    def to_eps(self, out, z, t):
        sa, sb = self._alpha(t, z)
        if self.prediction_type == "v_prediction":
            return sb * z + sa * out
        return out

    def to_v(self, x0, eps, t):
        sa, sb = self._alpha(t, x0)
        return sa * eps - sb * x0

    def log_snr(self, t):
        a = self.pipe.scheduler.alphas_cumprod[torch.as_tensor(t).long()].double()
        return torch.log(a / (1 - a))

    def step(self, out, t, z):
        return self.pipe.scheduler.step(out, t, z, return_dict=False)[0]

    def next_signal_scale(self, t) -> float:
        """The weight of x0 in the latent that the step from ``t`` lands on: sqrt(alpha_bar) at the previous
        timestep, found as DDIM finds it (t - train steps // inference steps; below 0 the scheduler's final
        alpha). Other schedulers: the next of their timesteps (exact for first-order steps only)."""
        sched = self.pipe.scheduler
        if getattr(sched.config, "solver_order", 1) > 1:
            raise NotImplementedError(
                f"{type(sched).__name__} (order {sched.config.solver_order}) combines this step's x0 with earlier "
                "ones, so no single weight of x0 exists; for the asymmetric reverse process switch to DDIM: "
                "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
        ac = sched.alphas_cumprod
        if hasattr(sched, "final_alpha_cumprod"):  # DDIM
            prev = int(t) - sched.config.num_train_timesteps // sched.num_inference_steps
            a = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
        else:
            ts = sched.timesteps.tolist()
            i = ts.index(int(t))
            a = ac[int(ts[i + 1])] if i + 1 < len(ts) else torch.tensor(1.0)
        return float(torch.as_tensor(a).double().sqrt())
