"""Re-MeanFlow: MeanFlow trained on the teacher's rectified (reflowed) coupling.

Zhang, Tan, Nguyen, Dao, Han, He, Zhang, Mrdovic, Metaxas 2025, "Flow Straighter and Faster: Efficient One-Step
Generative Modeling via MeanFlow on Rectified Trajectories" (arXiv 2511.23342); METHODS.md A11.

One reflow step, then MeanFlow. The teacher's ODE gives pairs (n, x = ODE_{1 -> 0}(n)) (the shared pair cache);
the student, started from the teacher's weights, regresses MeanFlow's target on the *paired* path

    z_t = (1 - t) x + t n,    v = n - x,    u_tgt = sg(v - (t - r) d/dt u_theta(z_t, r, t))

(Geng et al. 2025, eq. 10, with the coupling's v in place of fresh noise). On a straight coupling the average velocity
is n - x on the whole line, so d/dt u = 0 and the target is v itself: MeanFlow's JVP term only has to correct what
the single reflow left curved, which is why it trains faster and less noisily than MeanFlow on the teacher's data.

What the paper's recipe adds to MeanFlow, all in `ReMeanFlowConfig` with the released code's values:
- distance truncation: pairs with mean((n - x)^2) above a threshold (the most curved ones) are dropped. The paper's
  0.87 is a property of ImageNet-512 EDM2 latents (their scale and dimension), so jumpflow's default keeps every pair,
  as the released code's own default does; `distance_clip` sets an absolute threshold, `distance_quantile` a
  scale-free one (0.9 drops the farthest 10%). Dropped pairs leave the cache once, when the teacher is attached, so
  every batch keeps its size (drawn uniformly from the kept pairs);
- time pairs: t from the mirrored exponential density p(t) ~ (e^{a t} + e^{a (1 - t)}) of 2-rectified flow++
  (Lee et al. 2024), interval t - r ~ LN(-0.8, 1), r = clip(t - interval, 0, 1), r = 0 when t > 0.8 and r < 0.4 (a
  long jump finishes at the data), and 75% of pairs r = t (the paper's consistency_ratio 0.25);
- MeanFlow's adaptive loss on the per-sample *mean* squared error, D / sg(D + 0.01)^0.5 (the released recipe's
  p = 0.5, c = 1e-2).
Not carried over: the guided velocity of the paper's class-conditional stage (w, w_pi) and its EDM2-specific
t <= 80/81 clamp (jumpflow samples from t = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..jvp import JVP_MODES, refuse_ddp
from ..methods import register
from ..methods.base import LossOutput
from ..methods.meanflow import MeanFlow, adaptive_weighted, check_meanflow_config, meanflow_target
from ..paths import conditional_velocity, interpolate, logit_normal_times
from .pair_method import PairConfig, PairDistillation


def pair_distance(noise: Tensor, sample: Tensor) -> Tensor:
    """mean((n - x)^2) per pair, (N,): the paper's truncation statistic."""
    return (noise - sample).pow(2).flatten(1).mean(1)


def kept_pairs(distance: Tensor, clip: Optional[float] = None, quantile: Optional[float] = None) -> Tensor:
    """Boolean mask (N,) of the pairs distance truncation keeps: distance < clip (the paper's rule), or the
    ceil(quantile * N) nearest pairs; all of them when neither is set."""
    keep = torch.ones_like(distance, dtype=torch.bool)
    if clip is not None:
        keep = distance < clip
    elif quantile is not None:
        count = max(1, math.ceil(quantile * distance.numel()))
        keep = torch.zeros_like(keep)
        keep[torch.argsort(distance, stable=True)[:count]] = True  # exact count, even with ties
    return keep


def u_shaped_times(n: int, exponent: float, device=None) -> Tensor:
    """t ~ (p(t) + p(1 - t)) / 2 with p(t) = a e^{a t} / (e^a - 1): 2-rectified flow++'s U-shaped density, which
    spends the batch near the data and near the noise (inverse CDF of p, then a fair coin for the mirror)."""
    u = torch.rand(n, device=device)
    t = torch.log1p(u * math.expm1(exponent)) / exponent
    mirror = torch.rand(n, device=device) < 0.5
    return torch.where(mirror, 1 - t, t)


@dataclass
class ReMeanFlowConfig(PairConfig):
    # Distance truncation (at most one of the two; None = keep every pair, the released code's default).
    distance_clip: Optional[float] = None  # drop pairs with mean((n - x)^2) >= clip (paper: 0.87, ImageNet-512 latents)
    distance_quantile: Optional[float] = None  # keep this share of the pairs, the nearest ones
    # Time pairs (the released code's "re2_truncate" schedule with its README recipe's values).
    time_exponent: float = 4.0  # a in the U-shaped density ~ e^{a t} + e^{a (1 - t)}
    interval_mean: float = -0.8  # t - r ~ LN(interval_mean, interval_std)
    interval_std: float = 1.0
    zero_r_above: float = 0.8  # if t > zero_r_above and r < zero_r_below: r = 0
    zero_r_below: float = 0.4
    flow_matching_share: float = 0.75  # share with r = t (the paper's consistency_ratio 0.25 is the rest)
    # MeanFlow's adaptive weight D / sg(D + eps)^p, with D the per-sample *mean* squared error (the paper's code).
    adaptive_power: float = 0.5
    adaptive_eps: float = 0.01
    class_dropout: float = 0.1
    jvp_mode: str = "exact"  # "exact" (torch.func.jvp) or "finite_difference"

    def __post_init__(self):
        self.check_pairs()
        check_meanflow_config(self)
        if self.distance_clip is not None and self.distance_quantile is not None:
            raise JumpflowError("give distance_clip or distance_quantile, not both (two truncation rules)")
        if self.distance_clip is not None and not self.distance_clip > 0:
            raise JumpflowError(f"distance_clip must be > 0 (or None to keep every pair), got {self.distance_clip!r}")
        if self.distance_quantile is not None and not 0 < self.distance_quantile <= 1:
            raise JumpflowError(f"distance_quantile must lie in (0, 1] (or None), got {self.distance_quantile!r}")
        if not self.time_exponent > 0:
            raise JumpflowError(f"time_exponent must be > 0, got {self.time_exponent!r}")
        if not self.interval_std > 0:
            raise JumpflowError(f"interval_std must be > 0, got {self.interval_std!r}")
        for name in ("zero_r_above", "zero_r_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise JumpflowError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.jvp_mode not in JVP_MODES:
            raise JumpflowError(f"unknown jvp_mode {self.jvp_mode!r}; valid: {', '.join(JVP_MODES)}")


@register
class ReMeanFlow(PairDistillation, MeanFlow):
    """Re-MeanFlow: MeanFlow's average velocity trained on the teacher's reflowed (noise, sample) coupling."""

    name = "re_meanflow"
    paper = "Zhang et al. 2025, Flow Straighter and Faster (arXiv 2511.23342)"
    Config = ReMeanFlowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def attach_teacher(self, teacher, workspace: Path) -> None:
        """Build or load the pair cache (PairDistillation), then apply distance truncation to it once."""
        super().attach_teacher(teacher, workspace)
        cfg = self.config
        noise, sample, labels = self.__dict__["_pairs"]
        distance = pair_distance(noise, sample)
        keep = kept_pairs(distance, cfg.distance_clip, cfg.distance_quantile)
        if not keep.any():
            raise JumpflowError(f"distance_clip={cfg.distance_clip} drops every pair: their mean((n - x)^2) runs from "
                                f"{distance.min().item():.3g} to {distance.max().item():.3g} (median "
                                f"{distance.median().item():.3g}); raise it or use distance_quantile")
        self.__dict__["_pairs"] = tuple(None if p is None else p[keep] for p in (noise, sample, labels))
        self.__dict__["kept_share"] = keep.float().mean().item()

    def sample_time_pair(self, n: int, device) -> Tuple[Tensor, Tensor]:
        """(t, r), r <= t, by the paper's schedule (module docstring)."""
        cfg = self.config
        t = u_shaped_times(n, cfg.time_exponent, device)
        r = (t - logit_normal_times(n, cfg.interval_mean, cfg.interval_std, device)).clamp(0, 1)
        r = torch.where((t > cfg.zero_r_above) & (r < cfg.zero_r_below), torch.zeros_like(r), r)
        same = torch.rand(n, device=device) < cfg.flow_matching_share
        return t, torch.where(same, t, r)

    def coupled_point(self, batch_size: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(z_t, t, r, v, labels): a point on a pair's straight line z_t = (1 - t) x + t n, v = n - x."""
        noise, sample, labels = self.pair_batch(batch_size, device)
        t, r = self.sample_time_pair(batch_size, device)
        return interpolate(sample, noise, t), t, r, conditional_velocity(sample, noise), labels

    def training_point(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """MeanFlow's hook (used by its JVP self-check), on the coupling instead of fresh noise."""
        return self.coupled_point(x.shape[0], x.device)[:4]

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        refuse_ddp(self.net)
        z, t, r, v, pair_labels = self.coupled_point(x.shape[0], x.device)  # the data batch gives only size/device
        pair_labels = self.drop_labels(pair_labels, cfg.class_dropout)

        def average_velocity(z_, t_, r_):
            return self.net(z_, t_, r_, pair_labels).float()

        u, u_target = meanflow_target(average_velocity, z, t, r, v, cfg.jvp_mode)
        delta = (u - u_target).pow(2).flatten(1).mean(1)  # per-sample mean squared error (the paper's code)
        loss = adaptive_weighted(delta, cfg.adaptive_power, cfg.adaptive_eps).mean()
        return LossOutput(loss, {"mse": delta.detach().mean()})
