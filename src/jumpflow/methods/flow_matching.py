"""Flow matching / rectified flow: the multi-step baseline and the teacher of the distillation methods.

Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, "Flow Straight and Fast".
METHODS.md A1: regress v_theta(z_t, t) on eps - x; sample by integrating dz/dt = v from t = 1 to t = 0.
At 1 step Euler returns roughly E[x] (a blur of the data): the failure mode one-step methods exist to beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..paths import conditional_velocity, interpolate, sample_times, time_grid
from . import register
from .base import LossOutput, Method


@dataclass
class FlowMatchingConfig:
    time_sampler: str = "uniform"  # "uniform" (rectified flow) or "logit_normal" (SD3)
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    class_dropout: float = 0.1  # share of labels replaced by the null label, for classifier-free guidance
    solver: str = "euler"  # "euler" (NFE = steps) or "heun" (NFE = 2 * steps)


@register
class FlowMatching(Method):
    """Flow matching with a linear path; Euler or Heun sampling with any number of steps."""

    name = "flow_matching"
    paper = "Lipman et al. 2023, Flow Matching for Generative Modeling (arXiv 2210.02747)"
    Config = FlowMatchingConfig
    default_sample_steps = 100
    bench_steps = (1, 2, 10, 100)  # 1 step: the failure to beat (the data mean); 100 steps: the teacher ceiling

    def velocity(self, net, z: Tensor, t: Tensor, labels: Optional[Tensor], guidance: Optional[float]) -> Tensor:
        """v_theta(z, t); with guidance w: v_u + w (v_c - v_u) (classifier-free guidance)."""
        if guidance is None or labels is None or guidance == 1.0:
            return net(z, t, t, labels)
        null = torch.full_like(labels, self.num_classes)
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        noise = torch.randn_like(x)
        t = sample_times(x.shape[0], cfg.time_sampler, cfg.time_mean, cfg.time_std, device=x.device)
        z = interpolate(x, noise, t)
        target = conditional_velocity(x, noise)
        v = self.net(z, t, t, self.drop_labels(labels, cfg.class_dropout))
        loss = (v.float() - target).pow(2).mean()  # L_FM
        return LossOutput(loss, {"mse": loss.detach()})

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None,
               guidance: Optional[float] = None, solver: Optional[str] = None) -> Tensor:
        self.check_steps(steps)
        net = net if net is not None else self.net
        solver = solver or self.config.solver
        if solver not in ("euler", "heun"):
            raise JumpflowError(f"unknown solver {solver!r}; valid: euler, heun")
        grid = time_grid(steps, device=noise.device)
        z = noise
        ones = torch.ones(noise.shape[0], device=noise.device)
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t_now  # negative: we integrate from noise to data
            v = self.velocity(net, z, ones * t_now, labels, guidance)
            if solver == "heun":
                z_euler = z + dt * v
                v = 0.5 * (v + self.velocity(net, z_euler, ones * t_next, labels, guidance))
            z = z + dt * v
        return z

    def nfe(self, steps: int) -> int:
        return 2 * steps if self.config.solver == "heun" else steps
