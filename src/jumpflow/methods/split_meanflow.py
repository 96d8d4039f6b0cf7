"""SplitMeanFlow: average velocities trained by interval splitting, without a JVP.

Guo et al. 2025, "SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative Modeling" (arXiv 2507.16884);
METHODS.md A4. No official code was found; the batch proportions below are unverified (see the config).

The network u_theta(z_t, r, t) is MeanFlow's average velocity over [r, t] (jumpflow's time: t = 1 noise, t = 0 data,
so z_r = z_t - (t - r) u; in the backbone signature net(z, t, s) the jump target time s is r). Additivity of the
integral of v over [r, t] = [r, s] + [s, t] gives, for r < s < t,

    (t - r) u(z_t, r, t) = (t - s) u(z_t, s, t) + (s - r) u(z_s, r, s),   z_s = z_t - (t - s) u(z_t, s, t)

(interval splitting consistency; MeanFlow's differential identity is its limit s -> t). With s = (1 - lam) t + lam r,
t - s = lam (t - r) and s - r = (1 - lam)(t - r), so the target needs no division:

    u_tgt = lam u(z_t, s, t) + (1 - lam) u(z_s, r, s)      (stop-gradient; two extra no-grad forwards)

The boundary r = t anchors it: u_theta(z_t, t, t) regresses on the conditional velocity eps - x (flow matching).
Time pairs, the flow-matching share and the k-step sampler are MeanFlow's (inherited from jumpflow.methods.meanflow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..paths import expand_time
from . import register
from .base import LossOutput
from .meanflow import MeanFlow, adaptive_weighted, check_meanflow_config


@torch.no_grad()
def split_meanflow_target(average_velocity, z: Tensor, t: Tensor, r: Tensor, lam: Tensor) -> Tensor:
    """Interval-splitting target lam u(z_t, s, t) + (1 - lam) u(z_s, r, s) with s = (1 - lam) t + lam r.

    `average_velocity(z, t, r)` follows the backbone's argument order (later time first). With the exact average
    velocity the target equals u(z_t, r, t): the operator has the exact u as a fixed point (tested).
    """
    s = (1 - lam) * t + lam * r  # r <= s <= t
    u_late = average_velocity(z, t, s).to(z.dtype)  # u(z_t, s, t): the jump t -> s
    z_s = z - expand_time(t - s, z) * u_late
    u_early = average_velocity(z_s, s, r).to(z.dtype)  # u(z_s, r, s): the jump s -> r
    return expand_time(lam, z) * u_late + expand_time(1 - lam, z) * u_early


@dataclass
class SplitMeanFlowConfig:
    # The paper gives no image/toy recipe (METHODS.md A4): every value below is unverified for SplitMeanFlow.
    # Time pairs come from MeanFlow's sampler. Default "independent": t ~ LN(time_mean, time_std), r ~ LN(r_mean,
    # r_std), r = min(r, t) (MeanFlow's official CIFAR-10 recipe), which puts r near 0 and trains the 1-step jump
    # directly. Measured on 8 gaussians (1000 steps, batch 1024): 1-step flow-map error 0.18 with these pairs, 0.30
    # with sorted uniform pairs and 0.99 with MeanFlow's default sorted LN(-0.4, 1) pairs, which almost never span
    # [0, 1]: unlike MeanFlow's identity, interval splitting reaches long jumps only by composing trained shorter ones.
    time_sampler: str = "logit_normal"  # or "uniform"
    time_mean: float = -0.6
    time_std: float = 1.6
    time_pair: str = "independent"  # or "sorted": t, r = max/min of two draws from the sampler above
    r_mean: float = -4.0
    r_std: float = 1.6
    flow_matching_share: float = 0.75  # share of the batch with r = t: MeanFlow's value, unverified for SplitMeanFlow
    min_gap: float = 1e-4  # pairs with t - r <= min_gap are too short to split and train as flow matching instead
    # MeanFlow's adaptive weight w = 1 / sg(Delta + eps)^p on the per-sample *summed* squared error (MeanFlow inlines
    # it; no shared function). Default p = 0, plain L2: the splitting target is deterministic given z_t, so its error
    # can reach ~0 while the boundary rows keep the variance of eps - x; with p = 1 the split rows got ~100x the
    # boundary's gradient weight, the network drifted to a trivially self-consistent map and did not even learn the
    # velocity (8 gaussians, 1000 steps, p = 1: 1-step flow-map error 2.14 with the default pairs, 1.53 with sorted
    # LN(-0.4, 1) pairs, whose boundary MSE stayed at 3.1 against 2.1 with p = 0).
    adaptive_power: float = 0.0
    adaptive_eps: float = 0.01
    class_dropout: float = 0.1  # labels replaced by the null label, for classifier-free guidance

    def __post_init__(self):
        check_meanflow_config(self)
        if not 0 <= self.min_gap < 1:
            raise JumpflowError(f"min_gap must lie in [0, 1), got {self.min_gap!r}")


@register
class SplitMeanFlow(MeanFlow):
    """SplitMeanFlow: average-velocity network trained on interval-splitting consistency (JVP-free)."""

    name = "split_meanflow"
    paper = ("Guo et al. 2025, SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative Modeling "
             "(arXiv 2507.16884)")
    Config = SplitMeanFlowConfig
    default_sample_steps = 1

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        z, t, r, v = self.training_point(x)  # MeanFlow's time pairs: a flow_matching_share has r = t
        split = (t - r) > cfg.min_gap  # consistency samples; the rest are the boundary (flow matching)
        r = torch.where(split, r, t)
        labels = self.drop_labels(labels, cfg.class_dropout)

        # Boundary / FM part: u(z_t, t, t) = eps - x. Consistency part: the interval-splitting target (no grad).
        target = v.clone()
        index = split.nonzero().squeeze(1)  # only these rows pay the two extra forwards
        if index.numel():
            sub_labels = labels[index] if labels is not None else None
            average_velocity = lambda z_, t_, r_: self.net(z_, t_, r_, sub_labels)  # noqa: E731
            lam = torch.rand(index.numel(), device=x.device, dtype=t.dtype)  # lam ~ U(0, 1)
            target[index] = split_meanflow_target(average_velocity, z[index], t[index], r[index], lam).to(v.dtype)

        u = self.net(z, t, r, labels).to(target.dtype)  # float32 under bf16 autocast
        delta = (u - target).pow(2).flatten(1).sum(1)  # per-sample squared error, summed (MeanFlow's convention)
        loss = adaptive_weighted(delta, cfg.adaptive_power, cfg.adaptive_eps).mean()
        per_coordinate = delta.detach() / x[0].numel()
        metrics = {"mse": per_coordinate.mean(),
                   "mse_split": (per_coordinate * split).sum() / split.sum().clamp(min=1),
                   "mse_boundary": (per_coordinate * ~split).sum() / (~split).sum().clamp(min=1)}
        return LossOutput(loss, metrics)

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> dict:
        return {}  # no JVP, nothing that can silently be wrong on a given backbone
