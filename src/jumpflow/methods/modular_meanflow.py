"""Modular MeanFlow: MeanFlow's identity loss with a tunable share of the gradient through its JVP.

You, Liu, He 2025, "Modular MeanFlow: Towards Stable and Scalable One-Step Generative Modeling" (arXiv 2508.17426);
METHODS.md A10. No official code. The paper writes x_1 ~ prior (noise), x_0 ~ data and jumps x_r = x_t - (t - r) u
for r < t: jumpflow's time (t = 1 noise), no conversion. In the backbone signature net(z, t, s), s is the paper's r.

The network u_theta(z_t, r, t) is MeanFlow's average velocity. The MeanFlow identity
v(z_t, t) = u(z_t, r, t) + (t - r) d/dt u(z_t, r, t), with d/dt u = v . grad_z u + d_t u (one JVP along the tangent
(v, dt = 1, dr = 0)), becomes the loss family (the paper's modular loss, "v-loss" form)

    L_lambda = E || u_theta + (t - r) SG_lambda[d/dt u_theta] - v ||^2,   SG_lambda(z) = lambda z + (1 - lambda) sg(z)

(gradient modulation). lambda = 0 is MeanFlow (u regressed on sg(v - (t - r) du/dt): the same gradient);
lambda = 1 back-propagates through the JVP (a double backward). The curriculum warms lambda(k) = min(1, k / T_warm)
over training steps k. Time pairs, the adaptive loss weight and the k-step sampler are MeanFlow's, inherited.
v is the linear path's conditional velocity eps - x, as in MeanFlow. (Secondary summaries of the paper write the
regressed velocity as (x_1 - x_0) / (t - r); that is not the velocity of z_t = (1 - t) x + t eps and would move the
identity's fixed point, so it is not used; the paper's own text was not available to check.)

Sharp edge, measured and tested: training sees the noisy v = eps - x both as the target and as the JVP tangent. At the
exact u the residual is a + B v with B = (t - r) grad_z u - I = -dPhi_{t->r}/dz and zero conditional mean, so
lambda = 0 keeps MeanFlow's fixed point, but lambda > 0 adds lambda times the gradient of the noise variance
E|B (v - E[v | z_t])|^2, a pull that shrinks the jump's Jacobian: the exact u is no longer stationary. On 8 gaussians
(1000 steps, batch 1024, 2 seeds) the default curriculum gave 1-step flow-map errors 0.41 / 0.44 against 0.29 / 0.23
with lambda = 0, with visibly tighter modes (median distance to the nearest mode 0.07 against 0.11; data 0.18);
fixed lambda = 1 gave 0.43. A lambda > 0 step costs ~1.5x a lambda = 0 step (the double backward).

jumpflow's remedy, and its default (`jvp_tangent="model"`; the paper's text could not be checked, and its summaries
write eps - x, kept as `jvp_tangent="conditional"`): take the JVP along the model's own instantaneous velocity
sg(u_theta(z_t, t, t)), as improved MeanFlow does. The tangent is then a function of z_t alone, the derivative of
du/dt with respect to theta too, and the residual's zero conditional mean makes the exact u stationary again for
every lambda (tested). It costs one more forward pass (no graph). On the toys bench's checkerboard (2000 x 1024
steps) it measured 1-step SW2 0.149 with 90% of samples in the squares and all 8 squares covered, against 0.848 (a
collapse onto 2 squares) with the conditional tangent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..jvp import JVP_MODES, jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..paths import expand_time
from . import register
from .base import LossOutput
from .meanflow import MeanFlow, MeanFlowConfig, adaptive_weighted, check_meanflow_config


def gradient_modulation(z: Tensor, lam: Union[float, Tensor]) -> Tensor:
    """SG_lambda(z) = lambda z + (1 - lambda) sg(z): the value of z, lambda times its gradient.

    Written sg(z) + lambda (z - sg(z)), the same function, whose value is z exactly for every lambda (no rounding).
    A Python 0 detaches outright, so no graph is kept through the JVP (lambda = 0 costs what MeanFlow costs).
    """
    if isinstance(lam, (int, float)) and lam == 0:
        return z.detach()
    return z.detach() + lam * (z - z.detach())


def modular_meanflow_residual(average_velocity, z: Tensor, t: Tensor, r: Tensor, v: Tensor,
                              lam: Union[float, Tensor], jvp_mode: str = "exact",
                              tangent: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(u_theta(z, r, t), u_theta + (t - r) SG_lambda[du/dt] - v): the modular loss's residual (v-loss form).

    `average_velocity(z, t, r)` follows the backbone's argument order (later time first). The residual is written
    u - (v - (t - r) SG_lambda[du/dt]), MeanFlow's u - target, so lambda = 0 matches MeanFlow to the bit. It is 0 for
    the exact average velocity and the marginal velocity v, for every lambda (the MeanFlow identity; tested).
    du/dt is taken along `tangent` (dz/dt), v unless given.
    """
    tangent = v if tangent is None else tangent
    u, du_dt = total_derivative(average_velocity, (z, t, r), (tangent, torch.ones_like(t), torch.zeros_like(r)),
                                mode=jvp_mode)
    gap = expand_time((t - r).clamp(0, 1), z)  # t - r clipped to [0, 1], as MeanFlow's target
    return u, u - (v - gap * gradient_modulation(du_dt, lam))


JVP_TANGENTS = ("conditional", "model")


@dataclass
class ModularMeanFlowConfig(MeanFlowConfig):
    # Inherited from MeanFlow (the paper builds on MeanFlow; these are MeanFlow's defaults, unverified for MMF):
    # sorted LN(-0.4, 1.0) time pairs with 75% r = t, adaptive weight p = 1.0, eps = 0.01 on the per-sample *summed*
    # squared error, class dropout 0.1, exact JVP.
    # lambda(k) = modulation * min(1, k / modulation_warmup_steps) at training step k. The paper's curriculum,
    # lambda(k) = min(1, k / T_warm), goes to 1 [paper summaries]; the value of T_warm is unverified (not found):
    # 500 is our choice, half of jumpflow's 1000-step toy budget. modulation_warmup_steps = 0 keeps lambda fixed at
    # `modulation` from the first step (0 = MeanFlow exactly, 1 = the fully differentiable identity loss). See the
    # module docstring for why lambda > 0 measured worse than 0 on 8 gaussians.
    modulation: float = 1.0
    modulation_warmup_steps: int = 500
    # dz/dt of the JVP: "model" = sg(u_theta(z_t, t, t)), jumpflow's remedy for the lambda > 0 bias and default, or
    # "conditional" = eps - x (MeanFlow's, and the loss as the paper's summaries write it; collapsed here). Module
    # docstring.
    jvp_tangent: str = "model"

    def __post_init__(self):
        if not 0.0 <= self.modulation <= 1.0:
            raise JumpflowError(f"modulation (lambda) must lie in [0, 1], got {self.modulation!r}")
        if not isinstance(self.modulation_warmup_steps, int) or self.modulation_warmup_steps < 0:
            raise JumpflowError(f"modulation_warmup_steps must be an integer >= 0, got "
                                f"{self.modulation_warmup_steps!r}")
        if self.jvp_tangent not in JVP_TANGENTS:
            raise JumpflowError(f"unknown jvp_tangent {self.jvp_tangent!r}; valid: {', '.join(JVP_TANGENTS)}")
        if self.jvp_mode not in JVP_MODES:
            raise JumpflowError(f"unknown jvp_mode {self.jvp_mode!r}; valid: {', '.join(JVP_MODES)}")
        if self.jvp_mode != "exact" and self.modulation > 0:
            raise JumpflowError("jvp_mode='finite_difference' gives du/dt without a gradient, so modulation > 0 "
                                "would be silently ignored: use jvp_mode='exact' or modulation=0 (MeanFlow)")
        check_meanflow_config(self)


@register
class ModularMeanFlow(MeanFlow):
    """Modular MeanFlow: MeanFlow with gradient modulation through the JVP, warmed up by a curriculum."""

    name = "modular_meanflow"
    paper = ("You, Liu, He 2025, Modular MeanFlow: Towards Stable and Scalable One-Step Generative Modeling "
             "(arXiv 2508.17426)")
    Config = ModularMeanFlowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net, config, shape, num_classes=0):
        super().__init__(net, config, shape, num_classes)
        # Training step k of the curriculum lambda(k); a buffer, so checkpoints carry it and a resumed run continues.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    def modulation(self) -> Union[float, Tensor]:
        """lambda(k) = modulation * min(1, k / T_warm) (0-d tensor on the counter's device: no host sync); a Python
        0.0 when the config fixes lambda = 0, so that MeanFlow's cost is kept (no graph through the JVP)."""
        cfg = self.config
        if cfg.modulation == 0:
            return 0.0
        if cfg.modulation_warmup_steps == 0:
            return torch.full((), cfg.modulation, device=self.training_step.device)
        progress = (self.training_step.float() / cfg.modulation_warmup_steps).clamp(max=1.0)
        return cfg.modulation * progress

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)
        z, t, r, v = self.training_point(x)  # MeanFlow's draws, in MeanFlow's order
        labels = self.drop_labels(labels, cfg.class_dropout)
        lam = self.modulation()
        dtype = torch.promote_types(x.dtype, torch.float32)  # JVP and loss in float32 (float64 stays)

        def average_velocity(z_, t_, r_):
            return self.net(z_, t_, r_, labels).to(dtype)

        tangent = None
        if cfg.jvp_tangent == "model":
            with torch.no_grad():
                tangent = average_velocity(z, t, t)  # u(z, t, t): the model's instantaneous velocity
        # L_lambda: || u_theta + (t - r) SG_lambda[du/dt] - v ||^2 with MeanFlow's adaptive weight 1 / sg(D + eps)^p
        _, residual = modular_meanflow_residual(average_velocity, z, t, r, v, lam, cfg.jvp_mode, tangent)
        delta = residual.pow(2).flatten(1).sum(1)  # per-sample squared error, summed (MeanFlow's convention)
        loss = adaptive_weighted(delta, cfg.adaptive_power, cfg.adaptive_eps).mean()
        if self.training:
            self.training_step += 1
        lam_metric = lam.detach() if isinstance(lam, Tensor) else x.new_zeros(())
        return LossOutput(loss, {"mse": delta.detach().mean() / x[0].numel(), "modulation": lam_metric})

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """MeanFlow's JVP-vs-finite-difference check and, when lambda can be > 0, TVM's check of the gradient
        through the JVP (a wrong backward rule of some op's forward-mode derivative would corrupt it silently).
        Runs on a copy whose all-zero parameters are re-drawn small (a zero output layer makes checks vacuous)."""
        if self.config.jvp_mode != "exact":
            return {}
        probe = nonvacuous_copy(self.net)
        z, t, r, v = self.training_point(x[:16].float())
        labels = labels[:16] if labels is not None else None
        fn = lambda z_, t_, r_: probe(z_, t_, r_, labels).float()  # noqa: E731
        tangents = (v, torch.ones_like(t), torch.zeros_like(r))  # any tangent checks the rule; v is at hand
        return jvp_report(probe, fn, (z, t, r), tangents, backward=self.config.modulation > 0)
