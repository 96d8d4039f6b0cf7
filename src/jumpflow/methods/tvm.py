"""Terminal Velocity Matching: a flow map whose derivative at its terminal time is the velocity where it lands.

Zhou, Parger, Haque, Song 2025, "Terminal Velocity Matching" (arXiv 2511.19797); METHODS.md A8. The paper and its
code use y_t = (1 - t) x + t eps (t = 1 noise): jumpflow's convention, no conversion.

The flow map f(z, t, s) (jump from t down to s <= t) of dz/dtau = v(z, tau) obeys, for every s,

    d/ds f(z, t, s) = v(f(z, t, s), s)                      (terminal velocity condition; METHODS.md §1.3.5)

with the + sign in jumpflow's time too: f(z, t, .) is the trajectory through z, parameterised by the time it reaches.
TVM parameterises f(z, t, s) = z + (s - t) w F_theta(z, t, s) (F_theta = jumpflow's net, w the CFG scale, 1 without
labels), so d/ds f = w (F_theta + (s - t) d_s F_theta) from one forward-mode JVP along the tangent (dz, dt, ds) =
(0, 0, 1). The loss matches it with a stop-gradient target w F_target(f, s, s) from an EMA "target" copy of the net,
and anchors the s = t boundary by flow matching at an independent time s'. Gradients flow through the JVP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..jvp import JVP_MODES, jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..paths import conditional_velocity, expand_time, interpolate, logit_normal_times
from . import register
from .base import EMATargetNet, LossOutput, Method


def terminal_velocity(jump_velocity, z: Tensor, t: Tensor, s: Tensor, jvp_mode: str = "exact",
                      detach_jvp: bool = False) -> Tuple[Tensor, Tensor]:
    """(f(z, t, s), d/ds f(z, t, s)) for f = z + (s - t) F with F = jump_velocity(z, t, s) (w already applied).

    d/ds f = F + (s - t) d_s F, d_s F from one JVP along (0, 0, 1). In "exact" mode d_s F keeps its graph (the paper
    back-propagates through the JVP) unless detach_jvp; the finite-difference fallback returns it without one.
    """
    F, dF_ds = total_derivative(jump_velocity, (z, t, s), (torch.zeros_like(z), torch.zeros_like(t),
                                                            torch.ones_like(s)), mode=jvp_mode)
    if detach_jvp:
        dF_ds = dF_ds.detach()
    gap = expand_time(s - t, z)
    return z + gap * F, F + gap * dF_ds


def truncated_logit_normal(upper: Tensor, mean: float, std: float) -> Tensor:
    """s ~ LN(mean, std) conditioned on s <= upper, by inverse-CDF sampling of the underlying normal (TVM code)."""
    bound = (torch.logit(upper.clamp(1e-6, 1 - 1e-6).double()) - mean) / std
    u = torch.rand_like(bound) * torch.special.ndtr(bound)
    n = torch.special.ndtri(u.clamp(min=1e-300))
    return torch.sigmoid(mean + std * n).to(upper.dtype).clamp(max=upper)


@dataclass
class TVMConfig:
    s_mean: float = -0.4  # s ~ LN(-0.4, 1.0) truncated to s <= 1 - gap; also the FM time s' [code]
    s_std: float = 1.0
    gap_mean: float = -0.8  # gap t - s = sigmoid(N(-0.8, 1.0)) [code]
    gap_std: float = 1.0
    target_ema: float = 0.99  # EMA decay of the target net giving d/ds f's target [code]; 0 = the student, sg
    # CFG scale w for labelled samples (dropped labels use w = 1): f = z + (s - t) w F; the FM target is the guided
    # w (eps - x) + (1 - w) F_target(z, s', s', null) and both terms are scaled by 1 / w [code, ImageNet 256: 2.0].
    # The paper also feeds 1 / w to the net to learn a range of scales; jumpflow's backbones take no such input,
    # so w is fixed at training time and sampling uses the same w.
    guidance_scale: float = 2.0
    class_dropout: float = 0.1
    detach_jvp: bool = False  # [code]: False, gradients flow through d_s F (needs backward of the JVP)
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference" (derivative without gradient)


@register
class TVM(EMATargetNet, Method):
    """Terminal Velocity Matching: flow map trained on its terminal-time derivative plus flow matching."""

    name = "tvm"
    paper = "Zhou, Parger, Haque, Song 2025, Terminal Velocity Matching (arXiv 2511.19797)"
    Config = TVMConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net, config, shape, num_classes=0):
        super().__init__(net, config, shape, num_classes)
        cfg = config
        if cfg.jvp_mode not in JVP_MODES:
            raise JumpflowError(f"unknown jvp_mode {cfg.jvp_mode!r}; valid: {', '.join(JVP_MODES)}")
        if not 0.0 <= cfg.target_ema < 1.0:
            raise JumpflowError(f"target_ema must lie in [0, 1), got {cfg.target_ema}")
        if cfg.guidance_scale <= 0:
            raise JumpflowError(f"guidance_scale must be > 0, got {cfg.guidance_scale}")
        if cfg.s_std <= 0 or cfg.gap_std <= 0:
            raise JumpflowError(f"s_std and gap_std must be > 0, got {cfg.s_std}, {cfg.gap_std}")
        self.make_target_net(net)

    # --- pieces of the objective ----------------------------------------------------------------------------
    def sample_times(self, n: int, device) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, s, s'): gap = sigmoid(N), s ~ LN truncated to s <= 1 - gap, t = min(s + gap, 1); s' ~ LN for FM."""
        cfg = self.config
        gap = torch.sigmoid(cfg.gap_mean + cfg.gap_std * torch.randn(n, device=device))
        s = truncated_logit_normal(1.0 - gap, cfg.s_mean, cfg.s_std)
        t = (s + gap).clamp(max=1.0)
        return t, s, logit_normal_times(n, cfg.s_mean, cfg.s_std, device)

    def guidance(self, labels: Optional[Tensor], like: Tensor) -> Tensor:
        """Per-sample CFG scale w, shaped to broadcast against `like`: w for labelled samples, 1 for null/None."""
        ones = torch.ones(like.shape[0], device=like.device, dtype=like.dtype)
        if labels is None:
            return expand_time(ones, like)
        w = torch.where(labels != self.num_classes, ones * self.config.guidance_scale, ones)
        return expand_time(w, like)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)
        target_net = self.target_net if self.target_net is not None else self.net
        labels = self.drop_labels(labels, cfg.class_dropout)
        noise = torch.randn_like(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # JVPs and targets in float32 (float64 stays)
        t, s, s_fm = (time.to(dtype) for time in self.sample_times(x.shape[0], x.device))
        z_t, z_fm = interpolate(x, noise, t).to(dtype), interpolate(x, noise, s_fm)
        w = self.guidance(labels, z_t)

        def jump_velocity(z_, t_, s_):  # w F_theta(z, t, s): the map's average velocity over [s, t]
            return w * self.net(z_, t_, s_, labels).to(dtype)

        # Terminal velocity condition at s: d/ds f_theta(z_t, t, s) ~ sg w F_target(f_theta(z_t, t, s), s, s).
        f_ts, df_ds = terminal_velocity(jump_velocity, z_t, t, s, cfg.jvp_mode, cfg.detach_jvp)
        guided = labels is not None and cfg.guidance_scale != 1.0
        with torch.no_grad():
            velocity_at_landing = w * target_net(f_ts.detach(), s, s, labels).to(dtype)
            null = torch.full_like(labels, self.num_classes) if guided else None
            v_uncond = target_net(z_fm, s_fm, s_fm, null).to(dtype) if guided else 0.0
        terminal = ((df_ds - velocity_at_landing) / w).pow(2).flatten(1).mean(1)
        terminal = torch.where(torch.isclose(s, t), torch.zeros_like(terminal), terminal)  # no condition at s = t

        # Flow matching at s' (the s = t boundary): w F_theta(z_s', s', s') ~ w (eps - x) + (1 - w) v_uncond.
        v_target = w * conditional_velocity(x, noise).to(dtype) + (1.0 - w) * v_uncond
        fm = ((w * self.net(z_fm, s_fm, s_fm, labels).to(dtype) - v_target) / w).pow(2).flatten(1).mean(1)
        return LossOutput((terminal + fm).mean(), {"terminal": terminal.detach().mean(), "fm": fm.detach().mean()})

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """Exact JVP along (0, 0, 1) vs a finite difference and, unless detach_jvp, the gradient of the JVP (TVM
        back-propagates through it) vs a finite difference along that gradient's direction. Runs on a copy whose
        all-zero parameters are re-drawn small (zero output layers would make the checks pass vacuously)."""
        if self.config.jvp_mode != "exact":
            return {}
        probe = nonvacuous_copy(self.net)
        x = x[:16].float()
        labels = labels[:16] if labels is not None else None
        t, s, _ = self.sample_times(x.shape[0], x.device)
        z = interpolate(x, torch.randn_like(x), t)
        tangents = (torch.zeros_like(z), torch.zeros_like(t), torch.ones_like(s))
        fn = lambda z_, t_, s_: probe(z_, t_, s_, labels).float()  # noqa: E731
        return jvp_report(probe, fn, (z, t, s), tangents, backward=not self.config.detach_jvp)

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None, **options) -> Tensor:
        """k jumps on the uniform grid: z_{t_{i+1}} = z_{t_i} + (t_{i+1} - t_i) w F(z_{t_i}, t_i, t_{i+1})."""
        self.check_steps(steps)
        if options:
            raise JumpflowError(f"tvm sampling takes no option(s) {', '.join(sorted(options))}")
        net = net if net is not None else self.net
        return self.flow_map_jumps(noise, steps, net, labels, scale=self.guidance(labels, noise))
