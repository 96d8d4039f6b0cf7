"""Improved MeanFlow (iMF): MeanFlow recast as a v-loss, with classifier-free guidance as a conditioning input.

Geng et al. 2025, "Improved Mean Flows: On the Challenges of Fastforward Generative Models" (arXiv 2512.02012);
METHODS.md A3. Defaults and the loss were checked against the official JAX code (Lyy-iiis/imeanflow, read only).
Time convention: the paper's is jumpflow's own (t = 0 data, t = 1 noise, z_t = (1 - t) x + t eps, v = eps - x, a
jump from t down to r <= t), so nothing is converted; in the backbone signature net(z, t, s) the target time s is r.

The network has two heads on one trunk (backbone option heads=2, output [u, v] along dim 1): u the average velocity
over [r, t] (used for sampling) and v the instantaneous velocity (training only). It is conditioned on three extra
scalars (backbone option extra_inputs=3): 1 - 1/omega (the guidance scale, bounded), t_min and t_max (the guidance
interval), so guidance is picked at sampling time. One training step (the paper's algorithm):

1. (t, r): max/min of two LN(-0.4, 1) draws; the first `flow_matching_share` of the batch has r = t.
2. omega in [1, 1 + s_max] from a power law (cfg_beta = 1: log-uniform); t_min ~ U[0, 0.5], t_max ~ U[0.5, 1];
   r = t samples get the interval (0, 1). omega acts only inside the interval: omega' = omega there, else 1.
3. Guided velocity (the paper's CFG target): v_c, v_u = v-head at h = 0, no grad, with (omega', y) and (1, null):
   v_g = (eps - x) + (1 - 1/omega') (v_c - v_u). 10% class dropout: label null and v_g = eps - x.
4. One forward of both heads at (z_t, t, r, label, omega, t_min, t_max) with a JVP along the tangent (v_c, 1, 0):
   u, du/dt and the v-head output v. The tangent is the model's own velocity, not eps - x.
5. Compound function V = u + (t - r) sg(du/dt) (the iMF v-loss); gradients reach u but not du/dt.
   L = aw(sum (V - v_g)^2) + aw(sum (v - v_g)^2), aw(D) = D / sg(D + 0.01)^p, sums per sample.
Sampling: z_r = z_t - (t - r) u(z_t, t, r, omega, t_min, t_max, y) on a uniform grid (guidance given as inputs).

Where jumpflow differs from the paper, on purpose:
- The paper's net sees only h = t - r ("is noise conditioning necessary?"); jumpflow's backbones embed both t and
  h = t - s, and we keep that.
- The paper feeds class, time, omega and interval as in-context tokens of a transformer with 8-block u/v heads. With
  `backbone="dit"` and `backbone_options={"in_context_tokens": k}` (and `"adaln": False` for tokens alone) the same
  conditions are given as tokens; the MLP and UNet sum them into the conditioning vector (adaptive norm). On every
  backbone the two heads share everything but the output layer.
- Unconditional data (num_classes == 0, or labels None): there is nothing to guide, so omega is fixed at 1 (input
  0), the interval at (0, 1), v_g = eps - x and the tangent is the v-head's own velocity; sampling refuses guidance.
- Dropped labels: the official code takes the JVP tangent from the true label even when the u-head sees the null
  label; we use the null-label velocity v_u there, the tangent of the flow the null-label u averages.
- The official code regresses the v-head output of the JVP forward (at h = t - r, sampled omega and interval) on
  v_g: velocity_head_time="pair" (default) does that, reusing the forward; "instantaneous" evaluates the v-head in
  a separate forward at h = 0 instead (one more forward with gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..jvp import JVP_MODES, jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..paths import conditional_velocity, expand_time, interpolate, sample_times, time_grid
from . import register
from .base import LossOutput, Method
from .meanflow import adaptive_weighted

EXTRA_INPUTS = 3  # (1 - 1/omega, t_min, t_max)
HEADS = 2  # (u, v)
VELOCITY_HEAD_TIMES = ("pair", "instantaneous")


def at_least_float32(x: Tensor) -> Tensor:
    """Loss arithmetic in float32 under bf16 autocast; float64 (exact test fields) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def guidance_inputs(omega: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """(B,) x 3 -> the backbone's (B, 3) extra inputs; omega enters as 1 - 1/omega, in [0, 1) (paper)."""
    return torch.stack([1 - 1 / omega, t_min, t_max], dim=1)


def effective_guidance(omega: Tensor, t: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """omega inside the guidance interval [t_min, t_max], 1 (no guidance) outside."""
    return torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))


def guided_velocity(v_target: Tensor, v_cond: Tensor, v_uncond: Tensor, omega: Tensor) -> Tensor:
    """v_g = v_t + (1 - 1/omega) (v_c - v_u) (paper's CFG target). If the v-head already is the guided field
    v_c = omega v_cond + (1 - omega) v_u, then (1 - 1/omega)(v_c - v_u) = (omega - 1)(v_cond - v_u), so E[v_g] = v_c:
    the guided field is the fixed point (tested)."""
    return v_target + expand_time(1 - 1 / omega, v_target) * (v_cond - v_uncond)


def compound_velocity(two_heads: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, t: Tensor, r: Tensor,
                      tangent: Tensor, jvp_mode: str = "exact") -> Tuple[Tensor, Tensor]:
    """(V, v) from one forward of both heads with a JVP along (tangent, dt = 1, dr = 0):
    V = u + (t - r) sg(du/dt) (iMF's compound function) and v the v-head output of the same forward.

    With u the exact average velocity and the tangent the exact velocity, V is the exact velocity: the MeanFlow
    identity u = v - (t - r) du/dt rearranged, so iMF's stationary point is MeanFlow's (tested).
    """
    out, d_out = total_derivative(two_heads, (z, t, r), (tangent, torch.ones_like(t), torch.zeros_like(r)),
                                  mode=jvp_mode)
    u, v = out.chunk(HEADS, dim=1)
    du_dt = d_out.chunk(HEADS, dim=1)[0]
    return u + expand_time(t - r, z) * du_dt.detach(), v


@dataclass
class ImprovedMeanFlowConfig:
    # All defaults are the official code's ImageNet values [code]; the toy-scale behaviour is ours.
    time_sampler: str = "logit_normal"  # (t, r) = max/min of two draws
    time_mean: float = -0.4  # P_mean
    time_std: float = 1.0  # P_std
    flow_matching_share: float = 0.5  # data_proportion: the first half of the batch has r = t
    guidance_max: float = 7.0  # s_max: training omega in [1, 1 + s_max]
    guidance_beta: float = 1.0  # cfg_beta: density of omega ~ omega^-beta (1: log-uniform)
    interval_split: float = 0.5  # t_min ~ U[0, split], t_max ~ U[split, 1]
    class_dropout: float = 0.1
    adaptive_power: float = 1.0  # norm_p
    adaptive_eps: float = 0.01  # norm_eps, relative to per-sample *sums* of squares
    velocity_head_time: str = "pair"  # "pair": v-head output of the JVP forward (official); "instantaneous": h = 0
    jvp_tangent: str = "model"  # "model": the v-head's velocity (paper); "conditional": eps - x (MeanFlow's, ablation)
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"


@register
class ImprovedMeanFlow(Method):
    """Improved MeanFlow: a v-loss on u + (t - r) sg(du/dt), with guidance scale and interval as network inputs."""

    name = "imf"
    paper = ("Geng, Lu, Wu, Shechtman, Kolter, He 2025, Improved Mean Flows: On the Challenges of Fastforward "
             "Generative Models (arXiv 2512.02012)")
    Config = ImprovedMeanFlowConfig
    default_sample_steps = 1

    @classmethod
    def backbone_requirements(cls, config) -> dict:
        return {"extra_inputs": EXTRA_INPUTS, "heads": HEADS}

    def __init__(self, net, config: ImprovedMeanFlowConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self._validate(config)
        for option, need in self.backbone_requirements(config).items():
            have = getattr(net, option, need)  # nets that do not say (test doubles) are trusted
            if have != need:
                raise JumpflowError(f"imf needs a backbone built with {option}={need}, got {option}={have}; "
                                    f"build it with nets.build(..., extra_inputs={EXTRA_INPUTS}, heads={HEADS}) "
                                    f"(jumpflow.train does this itself)")

    @staticmethod
    def _validate(cfg: ImprovedMeanFlowConfig) -> None:
        checks = [
            (cfg.time_sampler in ("uniform", "logit_normal"), "time_sampler must be uniform or logit_normal"),
            (0.0 <= cfg.flow_matching_share <= 1.0, "flow_matching_share must be in [0, 1]"),
            (cfg.guidance_max >= 0.0, "guidance_max (s_max) must be >= 0"),
            (math.isfinite(cfg.guidance_beta), "guidance_beta must be a finite number"),
            (0.0 <= cfg.interval_split <= 1.0, "interval_split must be in [0, 1]"),
            (0.0 <= cfg.class_dropout < 1.0, "class_dropout must be in [0, 1)"),
            (cfg.adaptive_eps > 0.0 and cfg.adaptive_power >= 0.0, "adaptive_eps must be > 0, adaptive_power >= 0"),
            (cfg.velocity_head_time in VELOCITY_HEAD_TIMES,
             f"velocity_head_time must be one of {', '.join(VELOCITY_HEAD_TIMES)}"),
            (cfg.jvp_mode in JVP_MODES, f"jvp_mode must be one of {', '.join(JVP_MODES)}"),
            (cfg.jvp_tangent in ("model", "conditional"), "jvp_tangent must be model or conditional"),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise JumpflowError(f"bad imf option(s): {'; '.join(errors)} (config: {cfg})")

    # --- training -----------------------------------------------------------------------------------------
    def sample_time_pair(self, n: int, device) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, r, same) with r <= t; `same` marks the first flow_matching_share of the batch, where r = t."""
        cfg = self.config
        a = sample_times(n, cfg.time_sampler, cfg.time_mean, cfg.time_std, device=device)
        b = sample_times(n, cfg.time_sampler, cfg.time_mean, cfg.time_std, device=device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        same = torch.arange(n, device=device) < int(n * cfg.flow_matching_share)
        return t, torch.where(same, t, r), same

    def sample_guidance(self, n: int, device) -> Tensor:
        """omega in [1, 1 + s_max] with density ~ omega^-beta: inverse CDF of a uniform draw."""
        cfg = self.config
        u = torch.rand(n, device=device)
        if cfg.guidance_beta == 1.0:
            return torch.exp(u * math.log1p(cfg.guidance_max))  # log-uniform
        one_minus_beta = 1.0 - cfg.guidance_beta
        log_base = one_minus_beta * math.log1p(cfg.guidance_max)
        return torch.exp(torch.log1p(u * math.expm1(log_base)) / one_minus_beta)

    def sample_interval(self, same: Tensor) -> Tuple[Tensor, Tensor]:
        """t_min ~ U[0, split], t_max ~ U[split, 1]; (0, 1) for the r = t samples."""
        split = self.config.interval_split
        t_min = torch.rand(same.shape[0], device=same.device) * split
        t_max = split + torch.rand(same.shape[0], device=same.device) * (1 - split)
        return torch.where(same, 0.0, t_min), torch.where(same, 1.0, t_max)

    def velocity_head(self, net, z: Tensor, t: Tensor, labels: Optional[Tensor], omega: Tensor) -> Tensor:
        """The v-head at h = 0 with guidance scale omega and the dummy interval (0, 1) (official code)."""
        extra = guidance_inputs(omega, torch.zeros_like(omega), torch.ones_like(omega))
        return at_least_float32(net(z, t, t, labels, extra)).chunk(HEADS, dim=1)[1]

    @torch.no_grad()
    def guided_target(self, net, z: Tensor, t: Tensor, v_target: Tensor, labels: Optional[Tensor],
                      omega: Tensor, dropped: Tensor) -> Tuple[Tensor, Tensor]:
        """(v_g, JVP tangent) from the model's own v-head, without gradients.

        omega is the effective scale (1 outside the interval); `dropped` marks label-dropout samples, whose target is
        v_t and whose tangent is the null-label velocity v_u. Unconditional (labels None): (v_t, v-head at omega 1).
        """
        if labels is None:
            return v_target, self.velocity_head(net, z, t, None, torch.ones_like(omega))
        null = torch.full_like(labels, self.num_classes)
        both = self.velocity_head(net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, null]),
                                  torch.cat([omega, torch.ones_like(omega)]))  # one batched forward
        v_cond, v_uncond = both.chunk(2)
        v_guided = guided_velocity(v_target, v_cond, v_uncond, omega)
        keep = ~expand_time(dropped, z)
        return torch.where(keep, v_guided, v_target), torch.where(keep, v_cond, v_uncond)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)
        n = x.shape[0]
        noise = torch.randn_like(x)
        t, r, same = self.sample_time_pair(n, x.device)
        z = interpolate(x, noise, t)  # z_t = (1 - t) x + t eps
        v_target = conditional_velocity(x, noise)  # eps - x
        guided = labels is not None and self.num_classes > 0
        if guided:
            omega = self.sample_guidance(n, x.device)
            t_min, t_max = self.sample_interval(same)
            dropped = torch.rand(n, device=x.device) < cfg.class_dropout
            omega_eff = effective_guidance(omega, t, t_min, t_max)
        else:  # nothing to guide: omega = 1, interval (0, 1), no label dropout
            omega = omega_eff = t_max = torch.ones(n, device=x.device)
            t_min = torch.zeros(n, device=x.device)
            dropped, labels = torch.zeros(n, dtype=torch.bool, device=x.device), None
        v_guided, tangent = self.guided_target(self.net, z, t, v_target, labels, omega_eff, dropped)
        if cfg.jvp_tangent == "conditional":  # MeanFlow's tangent, for ablations: noisy, but needs no trained v-head
            tangent = v_target
        if guided:
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        extra = guidance_inputs(omega, t_min, t_max)

        def two_heads(z_, t_, r_):
            return at_least_float32(self.net(z_, t_, r_, labels, extra))

        compound, v = compound_velocity(two_heads, z, t, r, tangent, cfg.jvp_mode)
        if cfg.velocity_head_time == "instantaneous":
            v = two_heads(z, t, t).chunk(HEADS, dim=1)[1]
        delta_u = (compound - v_guided).pow(2).flatten(1).sum(1)  # per-sample sums (paper's convention)
        delta_v = (v - v_guided).pow(2).flatten(1).sum(1)
        loss = (adaptive_weighted(delta_u, cfg.adaptive_power, cfg.adaptive_eps)
                + adaptive_weighted(delta_v, cfg.adaptive_power, cfg.adaptive_eps)).mean()
        size = x[0].numel()
        return LossOutput(loss, {"mse": delta_u.detach().mean() / size, "mse_v": delta_v.detach().mean() / size})

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """Exact forward-mode JVP vs a finite difference on this network (see MeanFlow.self_check), with the guidance
        inputs set; all-zero parameters (the output layer) are re-drawn small on a copy so the check is not vacuous."""
        probe = nonvacuous_copy(self.net)
        x = x[:16].float()
        n = x.shape[0]
        noise = torch.randn_like(x)
        t, r, _ = self.sample_time_pair(n, x.device)
        labels = labels[:16] if labels is not None and self.num_classes > 0 else None
        ones = torch.ones(n, device=x.device)
        extra = guidance_inputs(2 * ones, 0.25 * ones, 0.75 * ones) if labels is not None else guidance_inputs(
            ones, 0 * ones, ones)
        fn = lambda z_, t_, r_: probe(z_, t_, r_, labels, extra).float()  # noqa: E731
        return jvp_report(probe, fn, (interpolate(x, noise, t), t, r),
                          (conditional_velocity(x, noise), torch.ones_like(t), torch.zeros_like(r)))

    # --- sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None, guidance: float = 1.0,
               interval: Sequence[float] = (0.0, 1.0)) -> Tensor:
        """k uniform jumps with the u-head: z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, t_i, t_{i+1}).

        guidance: the CFG scale omega (>= 1; 1 = none, the unconditional-safe default; the official code evaluates
        ImageNet B/2 at 7.5-8 with interval (0.4, 0.65)); interval: (t_min, t_max), where in time guidance acts. Both
        are inputs of the network, not a second forward: one NFE per step. With guidance > 1 pass an interval like
        the training ones (t_min <= interval_split <= t_max, both strictly inside (0, 1)): jumps with r < t are
        trained only on those, the default (0, 1) only on r = t rows, and on a toy 1-step samples guided with (0, 1)
        missed the data where (0.4, 0.65) did not.
        """
        self.check_steps(steps)
        omega, (t_min, t_max) = self._check_guidance(guidance, interval)
        net = net if net is not None else self.net
        n = noise.shape[0]
        full = lambda value: torch.full((n,), float(value), device=noise.device)  # noqa: E731
        extra = guidance_inputs(full(omega), full(t_min), full(t_max)).to(noise.dtype)
        grid = time_grid(steps, device=noise.device)
        z = noise
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            u = net(z, full(t_now).to(z.dtype), full(t_next).to(z.dtype), labels, extra).chunk(HEADS, dim=1)[0]
            z = z - (t_now - t_next) * u.to(z.dtype)
        return z

    def _check_guidance(self, guidance, interval) -> Tuple[float, Tuple[float, float]]:
        try:
            omega = float(guidance)
            t_min, t_max = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise JumpflowError(f"guidance must be a number and interval a pair (t_min, t_max), got "
                                f"guidance={guidance!r}, interval={interval!r}") from None
        if not omega >= 1.0 or not math.isfinite(omega):
            raise JumpflowError(f"guidance must be a finite number >= 1 (1 = no guidance; training covers "
                                f"[1, {1 + self.config.guidance_max:g}]), got {guidance!r}")
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise JumpflowError(f"interval must be (t_min, t_max) with 0 <= t_min <= t_max <= 1, got {interval!r}")
        if self.num_classes == 0 and (omega != 1.0 or (t_min, t_max) != (0.0, 1.0)):
            raise JumpflowError("this model is unconditional: it was trained without guidance, so guidance must be 1 "
                                "and interval (0, 1)")
        return omega, (t_min, t_max)
