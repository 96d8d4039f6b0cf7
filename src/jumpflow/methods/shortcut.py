"""Shortcut models: one network conditioned on the step size, made self-consistent across step sizes.

Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut Models" (arXiv 2410.12557); METHODS.md A5.
Official code: kvfrans/shortcut-models (JAX); the defaults below are that code's, as recorded in METHODS.md.

Time convention. The paper has x_t = (1 - t) x_0 + t x_1 with x_0 noise, t = 0 noise, and s_theta(x_t, t, d) predicts
the normalised jump (x_{t+d} - x_t) / d toward the data. jumpflow has t = 1 noise (t_lib = 1 - t_paper), so a step d
goes from t down to t - d, and the network

    net(z_t, t, t - d) = F(z_t, t, d) = (z_t - z_{t-d}) / d,     z_{t-d} = z_t - d F

is minus the paper's shortcut; as d -> 0 it is the ordinary velocity eps - x, so net(z, t, t) means what it means for
flow matching. (The code's path (1 - (1 - 1e-5) t) x_0 + t x_1 keeps a tiny noise floor at the data end; jumpflow's path
is the exact linear one.) The backbone embeds d = t - s continuously rather than the code's level index k = log2(1/d).

Training (the code's algorithm): a batch of B splits into B / bootstrap_every self-consistency samples and the rest
flow-matching samples.
* Flow matching at the finest step d = 1/M (M = max_resolution, standing in for d = 0): t = j / M, j ~ U{1..M},
  target eps - x, labels dropped with probability class_dropout.
* Bootstrap at levels k = 0..log2(M) - 1, d = 2^-k, spread evenly over the bootstrap rows; t = j d, j ~ U{1..1/d}
  (aligned to the grid so the jump t -> t - d stays in [0, 1]). Self-consistency target ("two steps of d/2 = one
  step of d"), from the EMA student without gradient:
      F1 = F(z_t, t, d/2),  z' = clip(z_t - d/2 F1),  F2 = F(z', t - d/2, d/2),  F_tgt = clip((F1 + F2) / 2).
* Loss: plain MSE, mean over coordinates and over the whole batch (so the bootstrap weight is about 1/bootstrap_every).
Sampling: K steps, K a power of two <= M, d = 1/K: z <- z - d F(z, t, d) for t = 1, 1 - d, ..., d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..paths import conditional_velocity, expand_time, interpolate
from . import register
from .base import LossOutput, Method


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def _clip(x: Tensor, bound: float) -> Tensor:
    return x.clamp(-bound, bound) if bound > 0 else x


@torch.no_grad()
def shortcut_target(net, z: Tensor, t: Tensor, d: Tensor, labels: Optional[Tensor], clip: float = 0.0) -> Tensor:
    """Self-consistency target (F(z_t, t, d/2) + F(z', t - d/2, d/2)) / 2 with z' = z_t - d/2 F(z_t, t, d/2).

    `net(z, t, s, cond)` is a shortcut network in jumpflow's convention (the normalised jump from t down to s); `clip`
    bounds z' and the target to [-clip, clip] (0: no clipping). With the exact shortcut (z - Phi_{t->t-d}(z)) / d the
    target equals the exact shortcut at step d: two exact half steps are one exact full step (tested).
    """
    half = d / 2
    first = net(z, t, t - half, labels).to(z.dtype)  # F1 = F(z_t, t, d/2)
    z_mid = _clip(z - expand_time(half, z) * first, clip)  # z' ~ z_{t - d/2}
    second = net(z_mid, t - half, t - d, labels).to(z.dtype)  # F2 = F(z', t - d/2, d/2)
    return _clip((first + second) / 2, clip)


@dataclass
class ShortcutConfig:
    max_resolution: int = 128  # M (`denoise_timesteps`) [code]: finest step 1/M, at most M sampling steps
    bootstrap_every: int = 8  # 1 / bootstrap_every of the batch trains self-consistency [code]
    bootstrap_from_ema: bool = True  # targets from the EMA student (`bootstrap_ema=1`) [code]
    clip: float = 4.0  # bound on z' and the bootstrap target [code]; set for data of unit scale; 0 = no clipping
    class_dropout: float = 0.1  # label dropout of the flow-matching part, for classifier-free guidance [code]

    def __post_init__(self):
        if not _is_power_of_two(self.max_resolution) or self.max_resolution < 2:
            raise JumpflowError(f"max_resolution must be a power of two >= 2, got {self.max_resolution!r}")
        if isinstance(self.bootstrap_every, bool) or not isinstance(self.bootstrap_every, int) \
                or self.bootstrap_every < 1:
            raise JumpflowError(f"bootstrap_every must be a positive integer, got {self.bootstrap_every!r}")
        if not self.clip >= 0:
            raise JumpflowError(f"clip must be >= 0 (0 disables clipping), got {self.clip!r}")
        if not 0 <= self.class_dropout <= 1:
            raise JumpflowError(f"class_dropout must lie in [0, 1], got {self.class_dropout!r}")


@register
class Shortcut(Method):
    """Shortcut models: a step-size-conditioned network, flow matching at the finest step plus self-consistency."""

    name = "shortcut"
    paper = "Frans et al. 2024, One Step Diffusion via Shortcut Models (arXiv 2410.12557)"
    Config = ShortcutConfig
    default_sample_steps = 1
    bench_steps = (1, 2, 4)

    @property
    def levels(self) -> int:
        """log2(M): bootstrap levels k = 0..levels - 1 (d = 1 .. 2/M); flow matching at k = levels (d = 1/M)."""
        return self.config.max_resolution.bit_length() - 1

    def bootstrap_times(self, n: int, device, dtype) -> Tuple[Tensor, Tensor]:
        """(t, d) for n bootstrap rows: levels k spread evenly (cyclically) over the rows, d = 2^-k, and t = j d with
        j ~ U{1..2^k}, so t - d >= 0 and t lies on the grid of d."""
        k = torch.arange(n, device=device) % self.levels
        sections = 2 ** k  # 1 / d
        j = (torch.rand(n, device=device) * sections).floor().clamp(max=sections - 1) + 1  # U{1..2^k}
        return (j / sections).to(dtype), (1.0 / sections).to(dtype)

    def flow_times(self, n: int, device, dtype) -> Tuple[Tensor, Tensor]:
        """(t, d) for n flow-matching rows: d = 1/M, t = j / M with j ~ U{1..M}."""
        m = self.config.max_resolution
        j = torch.randint(1, m + 1, (n,), device=device)
        return (j / m).to(dtype), torch.full((n,), 1.0 / m, device=device, dtype=dtype)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        batch = x.shape[0]
        n_boot = batch // cfg.bootstrap_every
        noise = torch.randn_like(x)
        t_boot, d_boot = self.bootstrap_times(n_boot, x.device, x.dtype)
        t_flow, d_flow = self.flow_times(batch - n_boot, x.device, x.dtype)
        t, d = torch.cat([t_boot, t_flow]), torch.cat([d_boot, d_flow])
        z = interpolate(x, noise, t)  # rows [0, n_boot) bootstrap, the rest flow matching

        # Targets: the EMA student's two half steps for the bootstrap rows (labels kept, as in the code); the
        # conditional velocity eps - x for the flow-matching rows (labels dropped for CFG).
        target = conditional_velocity(x, noise)
        boot_labels = labels[:n_boot] if labels is not None else None
        if n_boot:
            teacher = self.ema_net if cfg.bootstrap_from_ema else self.net
            target[:n_boot] = shortcut_target(teacher, z[:n_boot], t_boot, d_boot, boot_labels, cfg.clip).to(x.dtype)
        if labels is not None:
            labels = torch.cat([boot_labels, self.drop_labels(labels[n_boot:], cfg.class_dropout)])

        prediction = self.net(z, t, t - d, labels).to(target.dtype)  # float32 under bf16 autocast
        error = (prediction - target).pow(2).flatten(1).mean(1)  # per-sample mean over coordinates
        loss = error.mean()  # plain MSE over the whole batch [code]
        metrics = {"mse": loss.detach(), "mse_flow": error[n_boot:].detach().mean()}
        if n_boot:
            metrics["mse_bootstrap"] = error[:n_boot].detach().mean()
        return LossOutput(loss, metrics)

    def check_shortcut_steps(self, steps: int) -> None:
        self.check_steps(steps)
        m = self.config.max_resolution
        if not _is_power_of_two(steps) or steps > m:
            raise JumpflowError(f"shortcut models sample with a power of two steps up to max_resolution = {m} "
                                f"(1, 2, 4, ..., {m}), got {steps!r}")

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None, **options) -> Tensor:
        """K = steps jumps of d = 1/K: z_{t-d} = z_t - d F(z_t, t, d), from t = 1 down to 0."""
        self.check_shortcut_steps(steps)
        if options:
            raise JumpflowError(f"unknown sampling option(s) {', '.join(sorted(options))} for shortcut models")
        net = net if net is not None else self.net
        return self.flow_map_jumps(noise, steps, net, labels)  # F(z, t, d) = the jump / d
