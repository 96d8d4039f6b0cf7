"""Reflow (k-rectified flow) and InstaFlow's one-step distillation of a reflowed flow.

Liu, Gong, Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow"
(arXiv 2209.03003); Liu, Zhang, Ma, Peng, Liu 2024, "InstaFlow: One Step is Enough for High-Quality Diffusion-Based
Text-to-Image Generation" (arXiv 2309.06380). METHODS.md B1.

Reflow: flow matching on the teacher's coupling (z_1, z_0 = ODE_{1 -> 0}(z_1)) instead of independent (noise, data):
z_t = (1 - t) z_0 + t z_1, v_theta(z_t, t) regressed on z_1 - z_0. Its paths cross less than the teacher's, so its
ODE is straighter and few Euler steps land where the teacher's many steps did (the k-th reflow starts from the
(k-1)-th flow's weights; a reflow checkpoint is itself a teacher, for the next reflow or for InstaFlow).

InstaFlow's distillation: a one-step student regresses the teacher's endpoint, z_0 ~ z_1 - u_theta(z_1, 1, 0) (the
average velocity over the whole interval, jumpflow's flow-map convention), with an L2 or pseudo-Huber distance (the
paper uses LPIPS on images; jumpflow has no LPIPS network, so that choice is not offered). It is trained at t = 1,
s = 0 only, so it samples in exactly one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import LossOutput
from ..methods.flow_matching import FlowMatching, FlowMatchingConfig
from ..paths import conditional_velocity, interpolate, sample_times
from .pair_method import PairConfig, PairDistillation


@dataclass
class ReflowConfig(FlowMatchingConfig, PairConfig):
    # Flow matching's options (uniform t, as the rectified-flow paper; label dropout 0.1 for guidance; Euler) and
    # the pair cache's. The paper simulates its teacher with RK45; jumpflow's default is 100 Euler steps, the
    # teacher the benchmark compares against.
    def __post_init__(self):
        self.check_pairs()


@register
class Reflow(PairDistillation, FlowMatching):
    """k-rectified flow: flow matching on the teacher's noise-to-sample coupling, which straightens the flow."""

    name = "reflow"
    paper = "Liu, Gong, Liu 2023, Flow Straight and Fast (arXiv 2209.03003)"
    Config = ReflowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        noise, sample, pair_labels = self.pair_batch(x.shape[0], x.device)  # the data batch is not used
        t = sample_times(x.shape[0], cfg.time_sampler, cfg.time_mean, cfg.time_std, device=x.device)
        z = interpolate(sample, noise, t)
        v = self.net(z, t, t, self.drop_labels(pair_labels, cfg.class_dropout))
        loss = (v.float() - conditional_velocity(sample, noise)).pow(2).mean()  # L_FM on the coupling
        return LossOutput(loss, {"mse": loss.detach()})


@dataclass
class InstaFlowConfig(PairConfig):
    distance: str = "l2"  # "l2" or "pseudo_huber" (sqrt(|d|^2 + c^2) - c, c = 0.00054 sqrt(dim) as in iCT)
    class_dropout: float = 0.1  # label dropout, so the student also samples unconditionally

    def __post_init__(self):
        self.check_pairs()
        if self.distance not in ("l2", "pseudo_huber"):
            raise JumpflowError(f"distance must be l2 or pseudo_huber, got {self.distance!r}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise JumpflowError(f"class_dropout must be in [0, 1), got {self.class_dropout!r}")


@register
class InstaFlow(PairDistillation):
    """One-step distillation of a (reflowed) teacher: z_1 - u(z_1, 1, 0) regresses the teacher's ODE endpoint."""

    name = "instaflow"
    paper = ("Liu, Zhang, Ma, Peng, Liu 2024, InstaFlow: One Step is Enough for High-Quality Diffusion-Based "
             "Text-to-Image Generation (arXiv 2309.06380)")
    Config = InstaFlowConfig
    default_sample_steps = 1
    bench_steps = (1,)
    max_sample_steps = 1
    bench_teacher = "reflow"  # the paper's recipe: distil the 2-rectified flow, whose ODE is already straight

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        noise, sample, pair_labels = self.pair_batch(x.shape[0], x.device)
        ones = torch.ones(noise.shape[0], device=noise.device)
        jump = noise - self.net(noise, ones, 0 * ones, self.drop_labels(pair_labels, self.config.class_dropout))
        squared = (jump.float() - sample).pow(2).flatten(1).sum(1)  # per-sample |x_hat - z_0|^2
        if self.config.distance == "pseudo_huber":
            c = 0.00054 * sample[0].numel() ** 0.5
            per_sample = (squared + c * c).sqrt() - c
        else:
            per_sample = squared / sample[0].numel()
        return LossOutput(per_sample.mean(), {"mse": squared.detach().mean() / sample[0].numel()})

    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None, **options) -> Tensor:
        if steps != 1:
            raise JumpflowError(f"{self.name} is trained for one step (t = 1 to 0) only; got steps={steps!r}")
        return super().sample(noise, steps, labels, net, **options)
