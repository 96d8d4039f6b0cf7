"""SoFlow: learn the solution function of the velocity ODE with flow matching plus a JVP-free consistency loss.

Luo, Yuan, Liu 2025, "SoFlow: Solution Flow Models for One-Step Generative Modeling" (arXiv 2512.15657);
METHODS.md A9. The paper uses t = 1 noise, t = 0 data, z_t = (1 - t) x + t eps: jumpflow's convention, no conversion.

The solution function f(z_t, t, s) = z_s of dz/dtau = v(z, tau) satisfies f(z, t, t) = z and, along any trajectory,
f(z_t, t, s) = f(z_l, l, s) for every l between s and t. With the Euler parameterisation

    f_theta(z_t, t, s) = z_t + (s - t) F_theta(z_t, t, s)          (F_theta = jumpflow's net(z, t, s)),

f_theta(z, t, t) = z holds exactly, F_theta(z, t, t) is the instantaneous velocity (trained by flow matching), and the
solution-consistency loss compares f_theta(z_t, t, s) with a stop-gradient f_theta(z_l, l, s), where
z_l = z_t + (l - t) v is a short Euler step from t toward s along the (conditional or guided) velocity and
l = t + (s - t) rho(k) with rho decaying over training. No JVP: two forwards, one of them without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..paths import conditional_velocity, expand_time, interpolate, logit_normal_times
from . import register
from .base import LossOutput, Method


def _full(out: Tensor, like: Tensor) -> Tensor:
    """A network output in at least float32 (bf16 under autocast) and in float64 when the inputs are."""
    return out.to(torch.promote_types(like.dtype, torch.float32))


def consistency_residual(flow_map, z_t: Tensor, t: Tensor, s: Tensor, l: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(F_theta(z_t, t, s), delta) with delta = (f_theta(z_t, t, s) - sg f_theta(z_l, l, s)) / (t - l).

    `flow_map(z, t, s)` returns (F, f) with f = z + (s - t) F. z_l = z_t + (l - t) v (solution consistency, Euler step
    toward s). For the exact solution function and the marginal velocity v, delta = O(t - l) -> 0 (tested); the
    loss ||delta||^2 is the paper's consistency loss value.
    """
    F_t, f_t = flow_map(z_t, t, s)
    z_l = z_t + expand_time(l - t, z_t) * v
    with torch.no_grad():
        _, f_l = flow_map(z_l, l, s)
    delta = (f_t - f_l) / expand_time(t - l, z_t)
    return F_t, delta


@dataclass
class SoFlowConfig:
    # Share of the batch trained by flow matching at s = t ("velocity_loss_ratio"): 0.75 ImageNet [code], 0 CIFAR-10.
    flow_matching_share: float = 0.75
    fm_time_mean: float = -0.2  # FM times t ~ LN(-0.2, 1.0) [code, ImageNet]
    fm_time_std: float = 1.0
    t_mean: float = 0.2  # consistency t ~ LN(0.2, 0.8), clamped >= min_gap [code, ImageNet]
    t_std: float = 0.8
    s_mean: float = -1.0  # consistency s ~ LN(-1.0, 0.8), s <= t - min_gap [code, ImageNet]
    s_std: float = 0.8
    # rho(k) = gap_ratio_start * (gap_ratio_end / gap_ratio_start) ** min(k / gap_schedule_steps, 1): the share of
    # the way from t to s where the consistency target is taken [code: r_init 0.1, r_end 0.002 ImageNet; 1.0 and
    # 0.0003125 CIFAR-10]. The geometric form of the exponential decay and K = the run's length (400k for B/4) are
    # [unverified]; the official README advises a smaller start or a constant rho (start == end) for short runs.
    # gap_schedule_steps = 0: K = the training run's length (Trainer.plan), 400k outside a Trainer.
    gap_ratio_start: float = 0.1
    gap_ratio_end: float = 0.002
    gap_schedule_steps: int = 0
    min_gap: float = 1e-4  # t >= min_gap, s <= t - min_gap, l <= t - min_gap [code]
    adaptive_power: float = 1.0  # p in w = 1 / sg(||delta||^2 + eps)^p, ||.||^2 a per-sample mean [code: 1.0 ImageNet]
    adaptive_eps: float = 0.01  # eps [code: 0.01 ImageNet, 1e-3 CIFAR-10 with p = 0.75]
    class_dropout: float = 0.1
    # Training-time classifier-free guidance (labelled samples only) [code, ImageNet]:
    # v_g = v + gamma(t) (w - 1) (v - F(z, t, t, null)), then v_g <- m v_g + (1 - m) sg F(z, t, t, label).
    # gamma(t) = 1 for t <= guidance_max_time, else 0: the paper's gamma turns guidance off smoothly above 0.8; its
    # exact shape is [unverified], this step is our stand-in.
    guidance_scale: float = 3.0
    guidance_mix: float = 0.25
    guidance_max_time: float = 0.8


@register
class SoFlow(Method):
    """SoFlow: solution function trained by flow matching + JVP-free solution consistency."""

    name = "soflow"
    paper = "Luo, Yuan, Liu 2025, SoFlow: Solution Flow Models for One-Step Generative Modeling (arXiv 2512.15657)"
    Config = SoFlowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net, config, shape, num_classes=0):
        super().__init__(net, config, shape, num_classes)
        cfg = config
        if not 0.0 <= cfg.flow_matching_share <= 1.0:
            raise JumpflowError(f"flow_matching_share must lie in [0, 1], got {cfg.flow_matching_share}")
        if not 0.0 < cfg.gap_ratio_end <= 1.0 or not 0.0 < cfg.gap_ratio_start <= 1.0:
            raise JumpflowError(f"gap_ratio_start and gap_ratio_end must lie in (0, 1], got "
                                f"{cfg.gap_ratio_start}, {cfg.gap_ratio_end}")
        if cfg.gap_schedule_steps < 0:
            raise JumpflowError(f"gap_schedule_steps must be >= 0 (0 = the run's length), got {cfg.gap_schedule_steps}")
        if not 0.0 < cfg.min_gap < 0.5:
            raise JumpflowError(f"min_gap must lie in (0, 0.5), got {cfg.min_gap}")
        if cfg.adaptive_power < 0 or cfg.adaptive_eps <= 0:
            raise JumpflowError(f"adaptive_power must be >= 0 and adaptive_eps > 0, got {cfg.adaptive_power}, "
                                f"{cfg.adaptive_eps}")
        if not 0.0 <= cfg.guidance_mix <= 1.0:
            raise JumpflowError(f"guidance_mix must lie in [0, 1], got {cfg.guidance_mix}")
        # Training step k of the gap schedule rho(k); a buffer, so it is checkpointed and a resumed run continues it.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    # --- the solution function ------------------------------------------------------------------------------
    def flow_map(self, net, z: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(F, f): F = net(z, t, s) and the Euler parameterisation f(z, t, s) = z + (s - t) F."""
        F = _full(net(z, t, s, labels), z)
        return F, z + expand_time(s - t, z) * F

    def gap_ratio(self) -> Tensor:
        """rho(k): exponential decay from gap_ratio_start to gap_ratio_end over gap_schedule_steps (0-d tensor,
        computed on the step counter's device: no host sync)."""
        cfg = self.config
        length = cfg.gap_schedule_steps or self.planned_steps or 400_000
        progress = (self.training_step / length).clamp(max=1.0)
        return cfg.gap_ratio_start * (cfg.gap_ratio_end / cfg.gap_ratio_start) ** progress

    def consistency_times(self, n: int, device) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, s, l) with 0 <= s <= l < t: t, s logit-normal, l = t + (s - t) rho(k), at least min_gap below t."""
        cfg = self.config
        t = logit_normal_times(n, cfg.t_mean, cfg.t_std, device).clamp(min=cfg.min_gap)
        s = torch.minimum(logit_normal_times(n, cfg.s_mean, cfg.s_std, device), t - cfg.min_gap).clamp(min=0.0)
        l = torch.minimum(t + (s - t) * self.gap_ratio(), t - cfg.min_gap)
        return t, s, l

    def guided_velocity(self, z: Tensor, t: Tensor, v: Tensor, labels: Optional[Tensor]) -> Tensor:
        """Training-time CFG target for labelled samples (see the config); the conditional velocity otherwise."""
        cfg = self.config
        if labels is None or cfg.guidance_scale == 1.0:
            return v
        null = torch.full_like(labels, self.num_classes)
        with torch.no_grad():
            both = self.net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([labels, null]))
            v_cond, v_uncond = _full(both, v).chunk(2)
        gamma = expand_time((t <= cfg.guidance_max_time).to(v.dtype), v)
        guided = v + gamma * (cfg.guidance_scale - 1.0) * (v - v_uncond)
        guided = cfg.guidance_mix * guided + (1.0 - cfg.guidance_mix) * v_cond
        return torch.where(expand_time(labels != null, v), guided, v)

    # --- training -------------------------------------------------------------------------------------------
    def adaptive_weighted(self, delta: Tensor) -> Tuple[Tensor, Tensor]:
        """(per-sample mean ||delta||^2, adaptive weight 1 / sg(||delta||^2 + eps)^p)."""
        cfg = self.config
        mse = delta.pow(2).flatten(1).mean(1)
        return mse, 1.0 / (mse.detach() + cfg.adaptive_eps).pow(cfg.adaptive_power)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        b = x.shape[0]
        n_fm = int(round(cfg.flow_matching_share * b))
        labels = self.drop_labels(labels, cfg.class_dropout)
        noise = torch.randn_like(x)
        zero = x.new_zeros(())
        loss_fm, loss_c, mse_fm, mse_c = zero, zero, zero, zero

        if n_fm > 0:  # L_FM: F_theta(z_t, t, t) regressed on the (guided) conditional velocity
            xs, eps = x[:n_fm], noise[:n_fm]
            lab = labels[:n_fm] if labels is not None else None
            t = logit_normal_times(n_fm, cfg.fm_time_mean, cfg.fm_time_std, x.device).to(xs.dtype)
            z = interpolate(xs, eps, t)
            target = self.guided_velocity(z, t, _full(conditional_velocity(xs, eps), z), lab)
            mse, weight = self.adaptive_weighted(_full(self.net(z, t, t, lab), z) - target)
            loss_fm, mse_fm = (weight * mse).sum() / b, mse.detach().mean()

        if n_fm < b:  # L_SCM: f_theta(z_t, t, s) ~ sg f_theta(z_l, l, s), z_l one Euler step toward s
            xs, eps = x[n_fm:], noise[n_fm:]
            lab = labels[n_fm:] if labels is not None else None
            t, s, l = (time.to(xs.dtype) for time in self.consistency_times(b - n_fm, x.device))
            z = interpolate(xs, eps, t)
            v = self.guided_velocity(z, t, _full(conditional_velocity(xs, eps), z), lab)
            F_t, delta = consistency_residual(lambda z_, t_, s_: self.flow_map(self.net, z_, t_, s_, lab),
                                              z, t, s, l, v)
            # Regressing F_t on sg(F_t + delta) has the loss value ||delta||^2 and the gradient -2 w delta: twice that
            # of the paper's surrogate sgn(s - t) <F_t, sg(w delta)> (which avoids dividing by t - l twice), the same
            # factor 2 as the squared error of the FM part. (The plain gradient of ||delta||^2 would carry 1 / rho.)
            mse, weight = self.adaptive_weighted(F_t - (F_t + delta).detach())
            loss_c, mse_c = (weight * mse).sum() / b, mse.detach().mean()

        if self.training:
            self.training_step += 1
        # Total = n_FM / B * L_FM + n_C / B * L_SCM (each a mean over its part of the batch).
        return LossOutput(loss_fm + loss_c, {"mse_fm": mse_fm, "mse_consistency": mse_c,
                                              "gap_ratio": self.gap_ratio().detach()})
