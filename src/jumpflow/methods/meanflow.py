"""MeanFlow: one-step generation by learning the average velocity over an interval.

Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447); METHODS.md A2.

The network u_theta(z_t, r, t) models u = 1/(t - r) int_r^t v(z_tau, tau) dtau, so z_r = z_t - (t - r) u.
Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),    d/dt u = v . grad_z u + d_t u,

and training regresses u_theta on the stop-gradient right-hand side, with d/dt u from one forward-mode JVP along the
tangent (v, dt = 1, dr = 0). In jumpflow's backbone signature net(z, t, s) the jump target time s is MeanFlow's r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..jvp import jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..paths import conditional_velocity, expand_time, interpolate, sample_times
from . import register
from .base import LossOutput, Method


def meanflow_target(average_velocity, z: Tensor, t: Tensor, r: Tensor, v: Tensor, jvp_mode: str = "exact"):
    """(u_theta(z, r, t), sg(v - (t - r) du/dt)) with du/dt = v . grad_z u + d_t u from one JVP along (v, 1, 0).

    One dual forward gives u_theta (with its graph, for the gradient) and the total derivative. With the exact
    average velocity and the marginal velocity v, the target equals u: the MeanFlow identity (tested).
    """
    u, du_dt = total_derivative(average_velocity, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)),
                                mode=jvp_mode)
    gap = expand_time((t - r).clamp(0, 1), z)
    return u, (v - gap * du_dt).detach()


def adaptive_weighted(delta: Tensor, power: float, eps: float) -> Tensor:
    """MeanFlow's adaptive loss weight: D / sg(D + eps)^p per sample, D a per-sample *sum* of squares (p = 0: plain
    L2; p = 1: roughly a per-sample L1 of the error, robust to the heavy-tailed JVP targets)."""
    return delta / (delta.detach() + eps).pow(power)


def check_meanflow_config(cfg) -> None:
    """The checks every MeanFlow-family config shares: shares in [0, 1] and a valid adaptive weight."""
    for name in ("flow_matching_share", "class_dropout"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise JumpflowError(f"{name} must lie in [0, 1], got {getattr(cfg, name)!r}")
    if not cfg.adaptive_power >= 0 or not cfg.adaptive_eps > 0:
        raise JumpflowError(f"adaptive_power must be >= 0 and adaptive_eps > 0, got {cfg.adaptive_power!r} "
                            f"and {cfg.adaptive_eps!r}")


@dataclass
class MeanFlowConfig:
    time_sampler: str = "logit_normal"  # or "uniform"
    time_mean: float = -0.4  # LN(-0.4, 1.0): the paper's ImageNet default
    time_std: float = 1.0
    # "sorted": t, r = max/min of two draws from the sampler above (paper §4.3). "independent": t from the sampler
    # above, r ~ LN(r_mean, r_std), then r = min(r, t) (the official PyTorch code's improved CIFAR-10 recipe, with
    # t ~ LN(-0.6, 1.6), r ~ LN(-4.0, 1.6)): r then sits near 0, which trains the 1-step jump directly.
    time_pair: str = "sorted"
    r_mean: float = -4.0
    r_std: float = 1.6
    flow_matching_share: float = 0.75  # share of the batch with r = t (paper's best: 25% of r != t)
    adaptive_power: float = 1.0  # p in w = 1 / sg(Delta + eps)^p; 1.0 ImageNet, 0.75 CIFAR-10, 0 = plain L2
    adaptive_eps: float = 0.01  # eps in the adaptive weight (relative to the per-sample *sum* of squares)
    class_dropout: float = 0.1
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"

    def __post_init__(self):
        check_meanflow_config(self)


@register
class MeanFlow(Method):
    """MeanFlow: average-velocity network trained on the MeanFlow identity with a JVP target."""

    name = "meanflow"
    paper = "Geng et al. 2025, Mean Flows for One-step Generative Modeling (arXiv 2505.13447)"
    Config = MeanFlowConfig
    default_sample_steps = 1

    def sample_time_pair(self, n: int, device) -> Tuple[Tensor, Tensor]:
        """(t, r) with r <= t; a `flow_matching_share` of pairs have r = t (pure flow-matching samples)."""
        cfg = self.config
        a = sample_times(n, cfg.time_sampler, cfg.time_mean, cfg.time_std, device=device)
        if cfg.time_pair == "sorted":
            b = sample_times(n, cfg.time_sampler, cfg.time_mean, cfg.time_std, device=device)
            t, r = torch.maximum(a, b), torch.minimum(a, b)
        elif cfg.time_pair == "independent":
            t, r = a, torch.minimum(a, sample_times(n, "logit_normal", cfg.r_mean, cfg.r_std, device=device))
        else:
            raise JumpflowError(f"unknown time_pair {cfg.time_pair!r}; valid: sorted, independent")
        same = torch.rand(n, device=device) < cfg.flow_matching_share
        return t, torch.where(same, t, r)

    def training_point(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(z_t, t, r, v): a point on the linear path, its time pair and the conditional velocity eps - x."""
        noise = torch.randn_like(x)
        t, r = self.sample_time_pair(x.shape[0], x.device)
        return interpolate(x, noise, t), t, r, conditional_velocity(x, noise)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)
        z, t, r, v = self.training_point(x)
        labels = self.drop_labels(labels, cfg.class_dropout)

        def average_velocity(z_, t_, r_):
            return self.net(z_, t_, r_, labels).float()

        u, u_target = meanflow_target(average_velocity, z, t, r, v, cfg.jvp_mode)
        delta = (u - u_target).pow(2).flatten(1).sum(1)  # per-sample squared error, summed (paper's convention)
        loss = adaptive_weighted(delta, cfg.adaptive_power, cfg.adaptive_eps).mean()
        return LossOutput(loss, {"mse": delta.detach().mean() / x[0].numel()})

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """Exact forward-mode JVP vs a finite difference on this network, at a few training points.

        Backbones start with a zero output layer, which would make any check pass vacuously (both derivatives 0), so
        the check runs on a copy whose all-zero parameters are re-drawn small and random.
        """
        probe = nonvacuous_copy(self.net)
        z, t, r, v = self.training_point(x[:16].float())
        labels = labels[:16] if labels is not None else None
        fn = lambda z_, t_, r_: probe(z_, t_, r_, labels).float()  # noqa: E731
        return jvp_report(probe, fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
