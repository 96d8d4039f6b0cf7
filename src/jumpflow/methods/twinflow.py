"""TwinFlow: one-step generation from self-adversarial flows on twin trajectories.

Cheng, Sun, Li, Lin 2025, "TwinFlow: Realizing One-step Generation on Large Models with Self-adversarial Flows"
(arXiv 2512.05150); METHODS.md A12. Written from the paper's description and the facts (equations, batch split,
weights, time sampling, signs) of the official code, inclusionAI/TwinFlow `src/methodes/twinflow/twinflow.py`.

Time convention. The official code interpolates x_t = t z + (1 - t) x (z noise) and regresses F on z - x, with the
one-step output x_hat = x_t - t F(x_t, t, 0) and a jump x_s = x_t - (t - s) F(x_t, t, s): jumpflow's convention
exactly (t = 1 noise, v = eps - x, net = average velocity from t down to s), so no conversion is needed. Its extended
time t in [-1, 1] keeps the same path on |t|; only the network's time inputs change sign on the "fake" branch.

One backbone net(z, t, s, cond) plays two flows:
- the real flow (t >= 0): the data's flow map, trained by RCGM-style any-step consistency (L_base);
- the fake (twin) flow (times -t, -s): the flow from noise to the model's own one-step samples G(eps) =
  eps - net(eps, 1, 0), trained by plain flow matching on sg(G(eps)) with negated times (L_adv);
and the gap between the two velocities at the same point,

    Delta(x_t) = clip(F(x_t, -t, -t) - F(x_t, t, t), -1, 1)                      (self-adversarial signal)

is a DMD-like distribution-matching direction (v_fake - v_real = (x_hat_real - x_hat_fake) / t on the linear path),
applied to the one-step output through the stop-gradient regression (L_rectify)

    L_rectify = d(F(eps, 1, 0), sg(F(eps, 1, 0) - Delta)),   weight dm_weight,

whose gradient moves G(eps) along +Delta, i.e. toward the data and away from the model's own samples. It vanishes
when the one-step distribution equals the data distribution (the two velocity fields coincide): tested.

Batch split (official code): four equal parts -- `e2e` (t = 1 -> s = 0, plus L_rectify), `mul` (short segments,
s = t (1 - u multi_step_gap)), `any` (s ~ U(0, t)), `adv` (the fake flow). RCGM target for every real row: one step
of length `consistency_step` along the (guidance-enhanced) conditional velocity, then the rest of the interval in
`estimate_order` jumps of the target network,

    r = [(t - s) F(z_t, t, s) - (t_m - s) F_tgt(z_t - dt v, t_m, s)] / dt - v,   t_m = t - dt   (RCGM residual)
    target = sg(F - clip(r, -1, 1))                                 (plain flow matching r = F - v when t - s < dt)

with the gap weighting w = 1 + tan((1 - (t - s)) * 0.4 pi) (1 on fake rows), and the per-sample Barron-reweighted
loss d(a, b) = mse(a, b) sg((mse / c^2 / |alpha - 2| + 1)^((alpha - 2) / 2)) / c (alpha 1: about the RMS error).

Choices and deviations (be aware when comparing with the paper):
- Defaults are the official TwinFlow class defaults [code]; the values used in the paper's experiment configs were
  not readable and are unverified (some may differ per model, e.g. ema_decay_rate 0 for Qwen-Image).
- Targets come from jumpflow's EMA copy of the student (`ema_net`, the Trainer's decay, e.g. 0.999) rather than the
  code's own EMA (decay ramped toward 0.99); target_net="student" uses the current weights (the code's setting when
  its EMA decay is 0). The fake samples of `adv` rows and both velocities of Delta use the current student (code).
- Guidance-enhanced targets (v + enhanced_ratio (v_tgt(c) - v_tgt(null)) for real rows with 0 < t < 1) apply only
  with class labels; rows whose label was dropped get no enhancement. The code leaves dropout to its data loader;
  here class_dropout (0.1, jumpflow's CFG default, unverified for TwinFlow) drops labels as in meanflow.py.
- The code's consistency ratio is fixed at 1 (any-step rows draw s ~ U(0, t); the DM term is on), its optional
  data-free mode and its stochastic/extrapolated samplers are left out: sampling is plain uniform jumps.
- The backbone embeds t and t - s; on the fake branch it receives (-t, -t) (gap 0) and tells it from (t, t) through the
  odd (sine) Fourier features of t only, so the two branches are least distinct near t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..paths import conditional_velocity, expand_time, interpolate, sample_times, uniform_times
from . import register
from .base import LossOutput, Method

GROUPS = ("e2e", "mul", "any", "adv")


@dataclass
class TwinFlowConfig:
    # Shares of the batch for the four row groups (e2e, mul, any, adv); official default 1:1:1:1 [code].
    batch_split: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    time_sampler: str = "uniform"  # t ~ Beta(1, 1) [code default time_dist_ctrl]; or "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    multi_step_gap: float = 0.05  # `mul` rows: s = t (1 - u * 0.05) [code]
    consistency_step: float = 0.01  # RCGM finite-difference step dt [code]
    estimate_order: int = 2  # jumps of the target network over [s, t - dt] [code]
    target_clip: float = 1.0  # clip of the RCGM residual [code]
    target_net: str = "ema"  # "ema" (jumpflow's EMA student) or "student" (current weights, no grad)
    enhanced_ratio: float = 0.5  # guidance-enhanced target strength, labels only [code class default]
    enhanced_range: Tuple[float, float] = (0.0, 1.0)  # open interval of t that gets the enhancement [code]
    dm_weight: float = 0.5  # weight of L_rectify [code dist_match_cof]
    dm_clip: float = 1.0  # clip of Delta [code]
    gap_weight_angle: float = 0.4  # w = 1 + tan((1 - (t - s)) * angle * pi); 0 gives w = 1 [code: pi / 2.5]
    loss: str = "barron"  # "barron" (reweighted L2) or "l2" (per-sample mean of squares) [code default barron]
    barron_alpha: float = 1.0  # [code class default]
    barron_scale: float = 1e-3  # c [code class default]
    class_dropout: float = 0.1  # jumpflow's CFG label dropout [unverified for TwinFlow]


def regression_loss(pred: Tensor, target: Tensor, kind: str = "barron", alpha: float = 1.0,
                    scale: float = 1e-3) -> Tensor:
    """Per-sample distance d(pred, target) -> (B,): the mean of squares over non-batch dims, Barron-reweighted.

    Barron (alpha != 2): mse * sg((mse / c^2 / |alpha - 2| + 1)^((alpha - 2) / 2)) / c; for alpha = 1 and mse >> c^2
    this is about sqrt(mse), so every sample's gradient has about unit size (a robust, normalised regression).
    """
    mse = (pred - target).pow(2).flatten(1).mean(1)
    if kind == "l2":
        return mse
    if abs(alpha - 2.0) < 1e-5:
        return mse / scale
    weight = (mse.detach() / scale ** 2 / abs(alpha - 2.0) + 1.0).pow((alpha - 2.0) / 2.0)
    return mse * weight / scale


def jump_displacement(net: nn.Module, z: Tensor, t: Tensor, s: Tensor, jumps: int,
                      labels: Optional[Tensor]) -> Tensor:
    """z - z_s after `jumps` equal flow-map jumps of `net` from t down to s (each z <- z - (a - b) net(z, a, b))."""
    total = torch.zeros_like(z)
    for i in range(jumps):
        a, b = t + (s - t) * (i / jumps), t + (s - t) * ((i + 1) / jumps)
        step = expand_time(a - b, z) * net(z, a, b, labels).to(z.dtype)
        z, total = z - step, total + step
    return total


def rcgm_residual(target_net: nn.Module, F: Tensor, z: Tensor, t: Tensor, s: Tensor, v: Tensor, step: float,
                  jumps: int, labels: Optional[Tensor] = None) -> Tensor:
    """RCGM residual r of the real flow (no grad): [(t - s) F - (t_m - s) F_tgt(z - dt v, t_m, s)] / dt - v.

    With F the exact average velocity, v the exact marginal velocity and an exact target net, r = O(dt) (the one
    Euler step of length dt is the only approximation): the real-flow fixed point, tested. Rows with t - s < dt
    (and all rows when the interval is shorter than a step) are plain flow matching, r = F - v.
    """
    gap = t - s
    residual = F - v
    long = gap >= step
    if long.any():
        idx = long.nonzero().squeeze(1)
        t_l, s_l = t[idx], s[idx]
        z_m = z[idx] - step * v[idx]  # one Euler step along the (enhanced) conditional velocity
        rest = jump_displacement(target_net, z_m, t_l - step, s_l, jumps, None if labels is None else labels[idx])
        whole = expand_time(gap[idx], z) * F[idx]
        residual = residual.index_copy(0, idx, (whole - rest) / step - v[idx])
    return residual


def self_adversarial_delta(net: nn.Module, x_gen: Tensor, labels: Optional[Tensor], clip: float,
                           times: Optional[Tensor] = None) -> Tensor:
    """Delta = clip(F(x_t, -t, -t) - F(x_t, t, t), +-clip) on x_t = (1 - t) sg(x_gen) + t eps, t ~ U(0, 1) (no grad).

    F at negative times is the fake flow (toward the model's own samples), at positive times the real flow. Their
    difference equals (x_hat_real - x_hat_fake) / t: zero when the one-step distribution is the data distribution.
    """
    x_gen = x_gen.detach()
    t = uniform_times(x_gen.shape[0], x_gen.device) if times is None else times
    z = interpolate(x_gen, torch.randn_like(x_gen), t)
    fake = net(z, -t, -t, labels)
    real = net(z, t, t, labels)
    return (fake - real).to(x_gen.dtype).clamp(-clip, clip)


def rectify_loss(F_one_step: Tensor, delta: Tensor, **distance) -> Tensor:
    """L_rectify per sample: d(F, sg(F - Delta)); its gradient moves G = eps - F along +Delta."""
    return regression_loss(F_one_step, (F_one_step - delta).detach(), **distance)


@register
class TwinFlow(Method):
    """TwinFlow: one network on twin trajectories (t real, -t fake); their velocity gap trains the one-step map."""

    name = "twinflow"
    paper = ("Cheng, Sun, Li, Lin 2025, TwinFlow: Realizing One-step Generation on Large Models with "
             "Self-adversarial Flows (arXiv 2512.05150)")
    Config = TwinFlowConfig
    default_sample_steps = 1
    bench_steps = (1, 2)

    def __init__(self, net: nn.Module, config: TwinFlowConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self._validate(config)

    @staticmethod
    def _validate(cfg: TwinFlowConfig) -> None:
        split = tuple(cfg.batch_split)
        if len(split) != 4 or any(not isinstance(x, (int, float)) or x < 0 for x in split) or sum(split) <= 0:
            raise JumpflowError(f"batch_split must be 4 non-negative shares for (e2e, mul, any, adv) with a positive "
                                f"sum, got {cfg.batch_split!r}")
        if cfg.time_sampler not in ("uniform", "logit_normal"):
            raise JumpflowError(f"unknown time_sampler {cfg.time_sampler!r}; valid: uniform, logit_normal")
        if cfg.target_net not in ("ema", "student"):
            raise JumpflowError(f"unknown target_net {cfg.target_net!r}; valid: ema, student")
        if cfg.loss not in ("barron", "l2"):
            raise JumpflowError(f"unknown loss {cfg.loss!r}; valid: barron, l2")
        checks = {"consistency_step": 0 < cfg.consistency_step < 1, "multi_step_gap": 0 <= cfg.multi_step_gap <= 1,
                  "target_clip": cfg.target_clip > 0, "dm_clip": cfg.dm_clip > 0, "dm_weight": cfg.dm_weight >= 0,
                  "class_dropout": 0 <= cfg.class_dropout < 1, "barron_scale": cfg.barron_scale > 0,
                  "gap_weight_angle": 0 <= cfg.gap_weight_angle < 0.5}
        for key, ok in checks.items():
            if not ok:
                raise JumpflowError(f"invalid {key}={getattr(cfg, key)!r}: consistency_step in (0, 1), "
                                    f"multi_step_gap in [0, 1], clips and barron_scale > 0, dm_weight >= 0, "
                                    f"class_dropout in [0, 1), gap_weight_angle in [0, 0.5)")
        if not isinstance(cfg.estimate_order, int) or cfg.estimate_order < 1:
            raise JumpflowError(f"estimate_order must be a positive integer, got {cfg.estimate_order!r}")
        lo, hi = cfg.enhanced_range
        if not 0 <= lo <= hi <= 1:
            raise JumpflowError(f"enhanced_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {cfg.enhanced_range!r}")

    # --- the pieces of the algorithm ------------------------------------------------------------------------
    def batch_groups(self, n: int, device) -> Dict[str, Tensor]:
        """Contiguous row masks for e2e / mul / any / adv in the configured proportions (the last takes the rest)."""
        shares = [float(x) for x in self.config.batch_split]
        sizes = [int(round(n * x / sum(shares))) for x in shares[:-1]]
        sizes.append(n - sum(sizes))
        if any(share > 0 and size < 1 for share, size in zip(shares, sizes)) or min(sizes) < 0:
            raise JumpflowError(f"a batch of {n} is too small for batch_split {tuple(shares)}: every group with a "
                                f"positive share needs a row (use a batch of at least 4 with the default split)")
        masks, start = {}, 0
        for key, size in zip(GROUPS, sizes):
            mask = torch.zeros(n, dtype=torch.bool, device=device)
            mask[start:start + size] = True
            masks[key], start = mask, start + size
        return masks

    def sample_time_pairs(self, groups: Dict[str, Tensor], device) -> Tuple[Tensor, Tensor]:
        """(t, s), s <= t, per group: e2e (1, 0); mul s = t (1 - u gap); any s = t (1 - u); adv s = t (positive here:
        the sign flip is applied at the network input)."""
        cfg = self.config
        n = groups["e2e"].shape[0]
        t = sample_times(n, cfg.time_sampler, cfg.time_mean, cfg.time_std, device=device).clamp(0, 1)
        s = t * (1 - torch.rand(n, device=device))  # any-step: s ~ U(0, t)
        s = torch.where(groups["mul"], t * (1 - torch.rand(n, device=device) * cfg.multi_step_gap), s)
        s = torch.where(groups["adv"], t, s)
        e2e = groups["e2e"]
        return torch.where(e2e, torch.ones_like(t), t), torch.where(e2e, torch.zeros_like(s), s)

    def target_network(self) -> nn.Module:
        return self.ema_net if self.config.target_net == "ema" else self.net

    @staticmethod
    def one_step(net: nn.Module, noise: Tensor, labels: Optional[Tensor]) -> Tensor:
        """G(eps) = eps - net(eps, 1, 0): the one-step generator (a jump from t = 1 to s = 0)."""
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        return noise - net(noise, ones, torch.zeros_like(ones), labels).to(noise.dtype)

    def enhanced_velocity(self, target_net: nn.Module, z: Tensor, t: Tensor, v: Tensor, rows: Tensor,
                          labels: Optional[Tensor]) -> Tensor:
        """v + ratio (v_tgt(z, t | c) - v_tgt(z, t | null)) on `rows` with lo < t < hi (guidance-enhanced target)."""
        cfg = self.config
        if labels is None or self.num_classes == 0 or cfg.enhanced_ratio == 0:
            return v
        lo, hi = cfg.enhanced_range
        rows = rows & (t > lo) & (t < hi)
        if not rows.any():
            return v
        null = torch.full_like(labels, self.num_classes)
        cond, uncond = target_net(z, t, t, labels), target_net(z, t, t, null)
        return v + cfg.enhanced_ratio * expand_time(rows.to(v.dtype), v) * (cond - uncond).to(v.dtype)

    # --- training -------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        distance = dict(kind=cfg.loss, alpha=cfg.barron_alpha, scale=cfg.barron_scale)
        groups = self.batch_groups(x.shape[0], x.device)
        adv, e2e = groups["adv"], groups["e2e"]
        real = ~adv
        labels = self.drop_labels(labels, cfg.class_dropout)
        t, s = self.sample_time_pairs(groups, x.device)

        # L_adv data: the fake flow runs from noise to sg(G(eps')), the student's own one-step samples.
        if adv.any():
            with torch.no_grad():
                fake = self.one_step(self.net, torch.randn_like(x[adv]), _rows(labels, adv))
            x = x.clone()
            x[adv] = fake.to(x.dtype)
        noise = torch.randn_like(x)
        z = interpolate(x, noise, t)  # same linear path on both branches, at |t|
        v = conditional_velocity(x, noise)

        # One student forward for every row; fake rows get negated times (-t, -t): the twin trajectory.
        sign = torch.where(adv, -torch.ones_like(t), torch.ones_like(t))
        F = self.net(z, sign * t, sign * s, labels)  # (B, *shape): average velocity from t down to s

        with torch.no_grad():
            target_net = self.target_network()
            v_real = self.enhanced_velocity(target_net, z, t, v, real, labels)
            residual = torch.zeros_like(v)
            if real.any():  # L_base: RCGM any-step target on real rows
                idx = real.nonzero().squeeze(1)
                residual[idx] = rcgm_residual(target_net, F.detach()[idx].to(v.dtype), z[idx], t[idx], s[idx],
                                              v_real[idx], cfg.consistency_step, cfg.estimate_order,
                                              _rows(labels, real))
            residual = residual.clamp(-cfg.target_clip, cfg.target_clip)
            target = torch.where(expand_time(adv, v), v, F.detach().to(v.dtype) - residual)  # L_adv: plain FM
            weight = 1 + torch.tan((1 - (t - s)) * cfg.gap_weight_angle * math.pi)
            weight = torch.where(adv, torch.ones_like(weight), weight)

        per_sample = regression_loss(F, target.to(F.dtype), **distance)
        loss = (weight.to(per_sample.dtype) * per_sample).mean()
        metrics = {"mse_real": _masked_mean((F.detach() - target).pow(2).flatten(1).mean(1), real),
                   "mse_fake": _masked_mean((F.detach() - target).pow(2).flatten(1).mean(1), adv)}

        if e2e.any() and cfg.dm_weight > 0:  # L_rectify on the one-step output
            F_one = F[e2e]
            x_gen = z[e2e] - F_one.detach().to(z.dtype)  # G(eps) = eps - F(eps, 1, 0) (z_1 = eps)
            with torch.no_grad():
                delta = self_adversarial_delta(self.net, x_gen, _rows(labels, e2e), cfg.dm_clip)
            dm = rectify_loss(F_one, delta.to(F_one.dtype), **distance).mean()
            loss = loss + cfg.dm_weight * dm
            metrics["dm_delta"] = delta.abs().mean().detach()
        return LossOutput(loss, {k: v_.detach() for k, v_ in metrics.items()})



def _rows(labels: Optional[Tensor], mask: Tensor) -> Optional[Tensor]:
    return None if labels is None else labels[mask]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return values[mask].mean() if mask.any() else values.new_zeros(())
