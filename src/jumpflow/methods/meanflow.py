"""MeanFlow: one-step generation by learning the average velocity over an interval.

Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447); METHODS.md A2.

The network u_theta(z_t, r, t) models u = 1/(t - r) int_r^t v(z_tau, tau) dtau, so z_r = z_t - (t - r) u.
Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),    d/dt u = v . grad_z u + d_t u,

and training regresses u_theta on the stop-gradient right-hand side, with d/dt u from one forward-mode JVP along the
tangent (v, dt = 1, dr = 0). In jumpflow's backbone signature net(z, t, s) the jump target time s is MeanFlow's r.

Classifier-free guidance folded into training (same paper and its official ImageNet code; METHODS.md A2): for a
labelled sample with t in [guidance_t_start, guidance_t_end], v is replaced, in the JVP tangent and in the target
alike, by the guided field

    v_tilde = omega v + (1 - omega - kappa) u(z_t, t, t, null) + kappa u(z_t, t, t, c),

the two network evaluations being the model's own instantaneous velocity (s = t), without gradients. At the fixed
point u(z_t, t, t, c) = E[v_tilde | z_t, c] = omega v_c + (1 - omega - kappa) v_uncond + kappa u(z_t, t, t, c), so the
conditional velocity becomes the CFG field of scale omega' = omega / (1 - kappa) (the paper's effective scale):
sampling stays 1 NFE and unguided (MeanFlow.sample takes no guidance), guidance lives in the weights. omega = 1,
kappa = 0 (the defaults) is plain MeanFlow, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

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


def guided_field(v: Tensor, v_uncond: Tensor, v_cond: Union[Tensor, float], omega: float, kappa: float) -> Tensor:
    """MeanFlow's training-time CFG field v_tilde = omega v + (1 - omega - kappa) v_uncond + kappa v_cond (Geng et al.
    2025). With E[v | z_t, c] = v_c and the net's velocities exact, v_cond = v_c and kappa = 0 give the CFG field
    omega v_c + (1 - omega) v_uncond (tested)."""
    return omega * v + (1 - omega - kappa) * v_uncond + kappa * v_cond


def effective_guidance_scale(omega: float, kappa: float) -> float:
    """The sampling-time CFG scale a MeanFlow model trained with (omega, kappa) has learned: omega / (1 - kappa)."""
    return omega / (1 - kappa)


def check_guidance_config(cfg) -> None:
    """omega > 0 (finite), 0 <= kappa < 1 (omega / (1 - kappa) must exist) and 0 <= t_start <= t_end <= 1."""
    omega, kappa = cfg.guidance_omega, cfg.guidance_kappa
    if not (isinstance(omega, (int, float)) and math.isfinite(omega) and omega > 0):
        raise JumpflowError(f"guidance_omega must be a finite number > 0 (1 = no guidance), got {omega!r}")
    if not (isinstance(kappa, (int, float)) and 0 <= kappa < 1):
        raise JumpflowError(f"guidance_kappa must lie in [0, 1) (the effective scale is omega / (1 - kappa)), "
                            f"got {kappa!r}")
    start, end = cfg.guidance_t_start, cfg.guidance_t_end
    if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start <= end <= 1):
        raise JumpflowError(f"guidance_t_start and guidance_t_end must satisfy 0 <= t_start <= t_end <= 1, got "
                            f"{start!r} and {end!r}")


def check_meanflow_config(cfg) -> None:
    """The checks every MeanFlow-family config shares: shares in [0, 1] and a valid adaptive weight (and valid
    guidance options, for configs that have them)."""
    for name in ("flow_matching_share", "class_dropout"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise JumpflowError(f"{name} must lie in [0, 1], got {getattr(cfg, name)!r}")
    if not cfg.adaptive_power >= 0 or not cfg.adaptive_eps > 0:
        raise JumpflowError(f"adaptive_power must be >= 0 and adaptive_eps > 0, got {cfg.adaptive_power!r} "
                            f"and {cfg.adaptive_eps!r}")
    if hasattr(cfg, "guidance_omega"):
        check_guidance_config(cfg)


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
    class_dropout: float = 0.1  # labels replaced by the null label: trains u(z, t, t, null) that guidance needs
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"
    # CFG folded into training (module docstring): effective sampling scale omega / (1 - kappa); omega = 1, kappa = 0
    # is off (plain MeanFlow, the default here). METHODS.md A2 records omega = 1.0, kappa = 0.5 in the released ImageNet
    # config file (effective scale 2 by the formula) and omega ~ 2-3 with an interval for the paper's best runs.
    guidance_omega: float = 1.0
    guidance_kappa: float = 0.0
    guidance_t_start: float = 0.0  # guidance acts for t in [t_start, t_end] only (elsewhere v_tilde = v)
    guidance_t_end: float = 1.0

    def __post_init__(self):
        check_meanflow_config(self)

    @property
    def guided(self) -> bool:
        return self.guidance_omega != 1.0 or self.guidance_kappa != 0.0


@register
class MeanFlow(Method):
    """MeanFlow: average-velocity network trained on the MeanFlow identity with a JVP target."""

    name = "meanflow"
    paper = "Geng et al. 2025, Mean Flows for One-step Generative Modeling (arXiv 2505.13447)"
    Config = MeanFlowConfig
    default_sample_steps = 1

    def __init__(self, net, config, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        if getattr(config, "guided", False):
            if num_classes == 0:
                raise JumpflowError("guidance_omega / guidance_kappa fold classifier-free guidance into training and "
                                    "need a class-conditional model (class_conditional=True); this one is "
                                    "unconditional: leave them at 1.0 / 0.0")
            if type(self).loss is not MeanFlow.loss:  # a subclass with its own loss would silently ignore them
                raise JumpflowError(f"{self.name} does not fold guidance into training; guidance_omega / "
                                    f"guidance_kappa are MeanFlow's options: leave them at 1.0 / 0.0")

    @torch.no_grad()
    def guided_velocity(self, net, z: Tensor, t: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        """v_tilde (module docstring) for the labelled samples with t in [t_start, t_end]; v for dropped labels and
        outside the interval. The net's instantaneous velocities u(z, t, t, .) are evaluated without gradients, in
        one batched forward when kappa > 0 (null and class), else the null label only."""
        cfg = self.config
        null = torch.full_like(labels, self.num_classes)
        guided = (labels != self.num_classes) & (t >= cfg.guidance_t_start) & (t <= cfg.guidance_t_end)
        if cfg.guidance_kappa:
            both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([null, labels]))
            v_uncond, v_cond = both.to(v.dtype).chunk(2)
        else:
            v_uncond, v_cond = net(z, t, t, null).to(v.dtype), 0.0
        v_tilde = guided_field(v, v_uncond, v_cond, cfg.guidance_omega, cfg.guidance_kappa)
        return torch.where(expand_time(guided, v), v_tilde, v)

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
        if cfg.guided and labels is not None:  # off: no extra draw or forward, so the default loss is unchanged
            v = self.guided_velocity(self.net, z, t, v, labels)  # v_tilde, the JVP tangent and the target alike

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
