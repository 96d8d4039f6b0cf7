"""Align Your Flow: continuous-time flow-map distillation of a frozen velocity teacher (AYF-EMD, AYF-LMD).

Sabour, Fidler, Kreis 2025, "Align Your Flow: Scaling Continuous-Time Flow Map Distillation" (NeurIPS 2025,
arXiv 2506.14603); METHODS.md B9. No official code.

The student is a flow map in jumpflow's convention (t = 0 data, t = 1 noise, s <= t):

    f_theta(z_t, t, s) = z_t + (s - t) F_theta(z_t, t, s),        F_theta = net(z, t, s, labels)

(the paper's Euler parameterisation, c_skip = 1, c_out = s - t), so f(z, t, t) = z for any net and F(z, t, t) is
the velocity. The teacher is a frozen velocity v_phi(z, t) (`self.teacher.velocity`).

AYF-EMD (Eulerian map distillation, the default). The map to s must not change along the teacher's ODE:
d/dt f(x_t, t, s) = 0. The paper's discrete loss ||f_theta(x_t, t, s) - f_theta-(x_t', t', s)||^2 with t' a step
of the teacher's ODE toward s has, as the step goes to 0, the gradient (its Theorem 3.2)

    grad_theta E[ w'(t, s) sign(t - s) f_theta(x_t, t, s) . sg(d/dt f_theta-(x_t, t, s)) ],   w' = w |t - s|,   (EMD)
    d/dt f_theta- = (v_phi(x_t, t) - F_theta-) + (s - t) d/dt F_theta-,   d/dt F = JVP along (v_phi, 1, 0) on (z, t, s),

which is the continuous-time consistency gradient at s = 0 and flow matching's at s -> t. With f = z + (s - t) F the
direction is -(t - s) <grad F, g>, g = d/dt f_theta-, and jumpflow descends it through the sCM-style surrogate

    L = mean_dims || F_theta - sg(F_theta) - sg(normalise(g)) ||^2        (gradient -2/D <grad F, normalise(g)>)

whose gradient is the paper's with the per-sample weight w'(t, s) = 2 / (D (t - s) (||g|| + c)); without
normalisation w' = 2 / (D (t - s)), i.e. the discrete loss's w(t, s) = 2 / (D (t - s)^2) for the ODE step
t' = t - eps (t - s) (tested against that discrete loss's gradient as eps -> 0). Without normalisation, at s = t the
surrogate IS flow matching on the teacher: g = v_phi - F and L = mean_dims ||F - v_phi||^2 in value and gradient.

AYF-LMD (Lagrangian, `objective="lmd"`). The map's terminal velocity is the teacher's where it lands:
d/ds f(x_t, t, s) = v_phi(f(x_t, t, s), s); gradient grad E[ w'(t, s) sign(s - t) f_theta . sg(d/ds f_theta- -
v_phi(f_theta-, s)) ], d/ds f = F + (s - t) d/ds F from a JVP along (0, 0, 1); surrogate
L = mean_dims || F_theta - sg(F_theta) + sg(normalise(residual)) ||^2. At s = t it is flow matching too.

What is the paper's and what is jumpflow's (METHODS.md marks B9 [unverified]; the paper's PDF was not at hand, so
"[paper]" below is as reported by secondary sources that quote it: the DSL-Lab "Unified Framework for Diffusion
Distillation" post (EMD/LMD gradient forms with sign(t - s)), a NeurIPS-2025 paper note quoting Theorem 3.2's
w' = w |t - s|, the tangent split and the regularised warm-up with r_max = 0.99, and two third-party re-implementations
whose tangent normalisation c = 0.1 agrees):
- [paper] flow map f = x_t + (s - t) F; the EMD and LMD gradients above; theta- = sg(theta) (the current weights,
  not an EMA: one dual forward gives F with its graph and the tangent); tangent normalisation g / (||g|| + c), c = 0.1
  (sCM's); "regularised tangent warm-up": g = (v_phi - F-) + r (s - t) dF-/dt with r = min(r_max, step / warmup),
  r_max = 0.99 (at r = 0 the EMD gradient is flow matching's on the teacher, ||F - v_phi||^2; r_max < 1 keeps 1% of it
  for good, so the exact map is a fixed point only with r_max = 1, tested).
- [unverified -> choice] the warm-up length: sCM's 10k steps, or a tenth of a shorter run (sct.py's rule); the
  paper's (t, s) sampling (the two re-implementations disagree): here the gap t - s = sigmoid(N(0, 2^2)),
  s ~ U[0, 1 - gap], t = s + gap, with `flow_matching_fraction` of pairs at s = t (the boundary, where the surrogate is
  plain flow matching on the teacher). The wide gap puts pairs in the (t = 1, s = 0) corner the 1-step sampler uses:
  regressing the exact Gaussian map directly (600 steps, toy MLP) gives 1-step error 0.023 with it and 0.15 with
  TVM's sigmoid(N(-0.8, 1)) gap, which rarely draws gaps near 1. The weight w(t, s): none beyond the surrogate's (no
  learned adaptive weight); normalisation and no warm-up for LMD (the paper's stabilisers are stated for EMD).
- Not implemented: autoguidance (needs a weaker teacher), the adversarial fine-tuning stage, gamma-sampling (the
  sampler is the deterministic flow-map chain on the uniform grid, gamma = 0), any image-model preconditioning of the
  paper's students (jumpflow's backbones take t and s in [0, 1] directly).
- [choice] label dropout 0.1 as InstaFlow's (the teacher then gets the null label too); the student starts from the
  teacher's weights when the backbones match (consistency distillation's start; the paper's init is not verified).
Measured on N(mu, 0.3^2 I) with the exact teacher (toy MLP, EMA): both objectives reach 1-step errors ~0.1 and 2-step
~0.05 in a few hundred steps, then EMD improves slowly (0.11 after 1500 steps), while regressing the exact map reaches
0.02: the Eulerian loss propagates the boundary s = t up along the ODE, so it learns the long jumps last.
On a multimodal target EMD does not train here, even from the exact teacher (benchmarks/ayf_study.py, 8 gaussians).
Once the JVP term is on, the map gets worse at every step count, short jumps included: 1-step error 0.62 and 64-step
0.46, where the same run without the JVP term (flow matching on the teacher) reaches 0.017 at 64 steps. No lr, gap law,
tangent normalisation or flow-matching share tried changed that. LMD on the same run trains (1-step 0.19, 2-step
0.10). The tangent itself is right: the exact map zeroes it and it is the discrete loss's limit, both tested. So this
is the objective with theta- = theta on a sharp map, not a sign or JVP error. Use objective="lmd" where EMD stalls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..jvp import JVP_MODES, jvp_report, nonvacuous_copy, refuse_ddp, total_derivative
from ..methods import register
from ..methods.base import LossOutput, Method
from ..methods.sct import normalise_tangent
from ..paths import expand_time, interpolate
from .pair_method import PairDistillation

OBJECTIVES = ("emd", "lmd")
TANGENT_NORMS = ("l2", "rms", "none")
SCM_WARMUP_STEPS = 10_000  # sCM's tangent warm-up; the AYF paper's length is not verified
JumpVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # F(z, t, s) -> (B, *shape)
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(z, t) -> (B, *shape), no gradient


def eulerian_tangent(F: JumpVelocity, z: Tensor, t: Tensor, s: Tensor, velocity: Tensor, warmup_ratio=1.0,
                     jvp_mode: str = "exact") -> Tuple[Tensor, Tensor]:
    """(F(z, t, s) with its graph, g = d/dt f_theta-(z_t, t, s) along the teacher's ODE, detached).

    g = (v - F-) + r (s - t) dF-/dt with dF/dt = J_F . (v, 1, 0) (one dual forward), v = dz_t/dt the teacher's
    velocity at (z, t) and r the warm-up ratio. With r = 1 it is the total derivative of f = z + (s - t) F, which the
    exact flow map makes 0; at s = t it is v - F."""
    out, dF_dt = total_derivative(F, (z, t, s), (velocity, torch.ones_like(t), torch.zeros_like(s)), mode=jvp_mode)
    gap = expand_time(s - t, z)
    g = (velocity - out.detach()) + warmup_ratio * gap * dF_dt.detach()
    return out, g


def lagrangian_residual(F: JumpVelocity, z: Tensor, t: Tensor, s: Tensor, velocity_fn: VelocityFn,
                        jvp_mode: str = "exact") -> Tuple[Tensor, Tensor]:
    """(F(z, t, s) with its graph, d/ds f_theta-(z, t, s) - v(f_theta-(z, t, s), s), detached).

    d/ds f = F + (s - t) dF/ds with dF/ds = J_F . (0, 0, 1); the exact flow map makes the residual 0 (its terminal
    velocity is the velocity where it lands); at s = t it is F - v(z, t)."""
    out, dF_ds = total_derivative(F, (z, t, s), (torch.zeros_like(z), torch.zeros_like(t), torch.ones_like(s)),
                                  mode=jvp_mode)
    gap = expand_time(s - t, z)
    F_minus = out.detach()
    landing = z + gap * F_minus  # f_theta-(z, t, s)
    df_ds = F_minus + gap * dF_ds.detach()
    return out, df_ds - velocity_fn(landing, s).to(df_ds.dtype)


@dataclass
class AlignYourFlowConfig:
    """AYF's options; [paper] / [unverified] / [choice] as in the module docstring."""

    objective: str = "emd"  # "emd" (Eulerian, the paper's main loss) or "lmd" (Lagrangian)
    gap_mean: float = 0.0  # t - s = sigmoid(N(gap_mean, gap_std)) [choice, see the module docstring]
    gap_std: float = 2.0
    flow_matching_fraction: float = 0.0  # share of pairs with s = t [choice]
    tangent_norm: str = "l2"  # g / (||g|| + c) per sample [paper]; "rms": ||g|| / sqrt(D); "none"
    tangent_norm_const: float = 0.1  # c [paper]
    # r = min(warmup_max, step / warmup); None = sCM's 10k, or a tenth of a run shorter than 100k steps; 0 = r_max
    # from the first step [unverified].
    tangent_warmup_steps: Optional[int] = None
    tangent_warmup_max: float = 0.99  # r_max [paper]; 1 makes the exact flow map a fixed point of EMD
    class_dropout: float = 0.1  # [choice], as InstaFlow
    init_from_teacher: bool = True  # start from the teacher's weights when the backbones match
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise JumpflowError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.gap_std > 0 or not math.isfinite(self.gap_mean):
            raise JumpflowError(f"gap_std must be > 0 and gap_mean finite, got {self.gap_mean}, {self.gap_std}")
        if not 0 <= self.flow_matching_fraction <= 1:
            raise JumpflowError(f"flow_matching_fraction must be in [0, 1], got {self.flow_matching_fraction}")
        if self.tangent_norm not in TANGENT_NORMS:
            raise JumpflowError(f"tangent_norm must be one of {', '.join(TANGENT_NORMS)}, got {self.tangent_norm!r}")
        if not self.tangent_norm_const > 0:
            raise JumpflowError(f"tangent_norm_const must be > 0, got {self.tangent_norm_const}")
        warmup = self.tangent_warmup_steps
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
            raise JumpflowError(f"tangent_warmup_steps must be an integer >= 0 or None, got {warmup!r}")
        if not 0 < self.tangent_warmup_max <= 1:
            raise JumpflowError(f"tangent_warmup_max must be in (0, 1], got {self.tangent_warmup_max}")
        if not 0 <= self.class_dropout < 1:
            raise JumpflowError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if self.jvp_mode not in JVP_MODES:
            raise JumpflowError(f"jvp_mode must be one of {', '.join(JVP_MODES)}, got {self.jvp_mode!r}")


@register
class AlignYourFlow(Method):
    """Align Your Flow: a flow map distilled from a velocity teacher by the continuous-time EMD (or LMD) loss."""

    name = "align_your_flow"
    kind = "distillation"
    needs_teacher = True
    paper = ("Sabour, Fidler, Kreis 2025, Align Your Flow: Scaling Continuous-Time Flow Map Distillation "
             "(arXiv 2506.14603)")
    Config = AlignYourFlowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net: nn.Module, config: AlignYourFlowConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        # Training iterations seen by `loss`, for the warm-up: a buffer, so a resumed run continues its warm-up.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    def attach_teacher(self, teacher, workspace: Path) -> None:
        super().attach_teacher(teacher, workspace)
        if self.config.init_from_teacher:
            PairDistillation.start_from(self, teacher)  # no pair cache: only the weight copy is shared

    # --- pieces of the objective ------------------------------------------------------------------------------
    def sample_times(self, n: int, device) -> Tuple[Tensor, Tensor]:
        """(t, s), s <= t: gap = sigmoid(N(gap_mean, gap_std)), s ~ U[0, 1 - gap], t = s + gap; a share
        `flow_matching_fraction` has s = t."""
        cfg = self.config
        gap = torch.sigmoid(cfg.gap_mean + cfg.gap_std * torch.randn(n, device=device))
        s = (1 - gap) * torch.rand(n, device=device)
        t = (s + gap).clamp(max=1.0)
        if cfg.flow_matching_fraction > 0:
            s = torch.where(torch.rand(n, device=device) < cfg.flow_matching_fraction, t, s)
        return t, s

    def warmup_ratio(self) -> Tensor:
        """r = min(r_max, step / warmup) as a 0-d tensor (no host sync)."""
        cfg = self.config
        steps = cfg.tangent_warmup_steps
        if steps is None:
            steps = min(SCM_WARMUP_STEPS, (self.planned_steps or 10 * SCM_WARMUP_STEPS) // 10)
        if steps == 0:
            return torch.full((), cfg.tangent_warmup_max, device=self.training_step.device)
        return (self.training_step.float() / steps).clamp(max=cfg.tangent_warmup_max)

    def normalise(self, g: Tensor) -> Tensor:
        if self.config.tangent_norm == "none":
            return g
        return normalise_tangent(g, self.config.tangent_norm_const, self.config.tangent_norm)

    def objective(self, x: Tensor, noise: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor] = None,
                  warmup_ratio=1.0) -> Tuple[Tensor, Tensor]:
        """(per-sample surrogate loss (B,), unnormalised tangent or residual (B, *shape)) at given times.

        z_t = (1 - t) x + t eps; EMD: mean_dims ||F - sg F - sg normalise(g)||^2, LMD: ... + sg normalise(residual)."""
        cfg = self.config
        dtype = torch.promote_types(x.dtype, torch.float32)  # JVPs and targets in float32 (float64 stays)
        x, noise, t, s = x.to(dtype), noise.to(dtype), t.to(dtype), s.to(dtype)
        z = interpolate(x, noise, t)

        def F(z_, t_, s_):
            return self.net(z_, t_, s_, labels).to(dtype)

        def teacher_velocity(z_, t_):
            return self.teacher.velocity(z_, t_, labels).to(dtype)

        if cfg.objective == "emd":
            out, g = eulerian_tangent(F, z, t, s, teacher_velocity(z, t), warmup_ratio, cfg.jvp_mode)
            target = out.detach() + self.normalise(g)  # descend along -(t - s) <grad F, g>
        else:
            out, g = lagrangian_residual(F, z, t, s, teacher_velocity, cfg.jvp_mode)
            target = out.detach() - self.normalise(g)
        return (out - target).pow(2).flatten(1).mean(1), g

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        refuse_ddp(self.net)
        t, s = self.sample_times(x.shape[0], x.device)
        labels = self.drop_labels(labels, self.config.class_dropout)
        ratio = self.warmup_ratio() if self.config.objective == "emd" else 1.0
        per_sample, g = self.objective(x, torch.randn_like(x), t, s, labels, ratio)
        if self.training:
            self.training_step += 1
        metrics = {"tangent_norm": g.flatten(1).norm(dim=1).mean().detach().float()}
        if self.config.objective == "emd":
            metrics["warmup"] = torch.as_tensor(ratio).detach().float()
        return LossOutput(per_sample.mean().float(), metrics)

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        """Exact JVP vs a finite difference on a copy with its zero parameters re-drawn, along this objective's
        tangent ((eps - x, 1, 0) stands in for the teacher's velocity)."""
        probe = nonvacuous_copy(self.net)
        x = x[:16].float()
        labels = labels[:16] if labels is not None else None
        t, s = self.sample_times(x.shape[0], x.device)
        noise = torch.randn_like(x)
        z = interpolate(x, noise, t)
        if self.config.objective == "emd":
            tangents = (noise - x, torch.ones_like(t), torch.zeros_like(s))
        else:
            tangents = (torch.zeros_like(z), torch.zeros_like(t), torch.ones_like(s))
        return jvp_report(probe, lambda z_, t_, s_: probe(z_, t_, s_, labels).float(), (z, t, s), tangents)
