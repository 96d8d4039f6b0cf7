"""DMD2: a one-step generator distilled by distribution matching against a frozen teacher and an online fake score.

Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis" (NeurIPS 2024, arXiv 2405.14867); DMD: Yin, Gharbi, Zhang, Shechtman, Durand, Freeman, Park 2024,
"One-step Diffusion with Distribution Matching Distillation" (CVPR 2024, arXiv 2311.18828). METHODS.md B5.

DMD minimises KL(p_fake,t || p_real,t) averaged over noise levels; its gradient with respect to a generator output x
is the difference of the two scores at x_t, estimated with denoisers (the real one the teacher, the fake one a second
network trained online on the generator's samples):

    x = G_theta(eps) = eps - net(eps, 1, 0)                                   (jumpflow's flow-map convention)
    z_t = (1 - t) x + t n,  x_hat(z_t) = z_t - t v(z_t, t)                    (the linear path's denoiser)
    grad = (x_hat_fake - x_hat_real) / mean_dims |x - x_hat_real|           (DMD eq. 7's normalised gradient)
    L_DM = 1/2 || x - sg(x - grad) ||^2  (its gradient in x is grad)
    L_fake = || v_fake(z_t, t) - (n - sg x) ||^2                              (flow matching on the generator's samples)

On the linear path s(z_t) = -(z_t - (1 - t) x_hat) / t^2, so s_fake - s_real = (1 - t) / t^2 (x_hat_fake - x_hat_real):
the denoiser difference is the score difference up to a positive per-time weight, which the normalisation replaces.

DMD2's changes over DMD (all here): no regression loss by default (`regression_weight` = 0; DMD's 0.25 with an L2
distance, as jumpflow has no LPIPS, on a fixed set of teacher ODE pairs computed once when the teacher is attached and
held in memory, not in a pair cache), the two-time-scale rule (`fake_updates` = 5 fake-score
updates per generator update), and an optional GAN term (see below).

jumpflow's choices, each against the paper:
- Times: the paper draws a uniform index in [0.02 T, 0.98 T] of T = 1000 Karras noise levels (sigma 0.002 .. 80,
  rho 7, EDM); here the same index draw is mapped to jumpflow time with the same signal-to-noise ratio,
  t = sigma / (1 + sigma) (t from 0.0032 to 0.986, median 0.72). `time_schedule="uniform"` draws t ~ U[0.02, 0.98].
  The fake score's flow-matching times use the same draw (it is only asked at those times).
- The fake score's loss is flow matching (velocity MSE) instead of EDM's weighted denoising loss: both have the
  fake denoiser of p_fake as minimiser; it starts from the teacher's weights, as the paper's.
- GAN: the paper puts a classifier head on the fake U-Net's bottleneck; jumpflow's backbones expose no features, so
  `gan=True` uses a small separate discriminator MLP on noisy samples (z_t, t), trained with the fake-score
  optimizer (softplus(D(fake)) + softplus(-D(real)), weight 1e-2) and a generator term softplus(-D(G)) (3e-3).
  Off by default since it is not the paper's head.
- Sampling: one step only. DMD2's multi-step generator needs "backward simulation" training; this one is trained at
  t = 1 alone, so its denoise/re-noise chain would leave the distribution it was trained on.

The generator, the fake score, its loss, the two optimizers and one-step sampling are shared with SiD and SIM
(`score_distillation.ScoreDistillation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import LossOutput
from ..methods.consistency import sigma_to_time
from ..paths import interpolate
from .consistency_distillation import karras_sigmas
from .score_distillation import ScoreDistillation
from .teacher import check_solver

TIME_SCHEDULES = ("karras", "uniform")


@dataclass
class DMD2Config:
    """DMD2's ImageNet-64 recipe (METHODS.md B5; paper §4 and its code's defaults)."""

    fake_updates: int = 5  # fake-score updates per generator update (dfake_gen_update_ratio)
    fake_lr_scale: float = 1.0  # fake-score lr / generator lr (the paper: the same lr, 2e-6 both)
    time_schedule: str = "karras"  # "karras": uniform index of T Karras sigmas; "uniform": t ~ U[min, max]
    min_step_percent: float = 0.02  # the time range [0.02 T, 0.98 T]
    max_step_percent: float = 0.98
    num_train_timesteps: int = 1000  # T
    sigma_min: float = 0.002  # EDM's noise levels (ImageNet-64 teacher)
    sigma_max: float = 80.0
    rho: float = 7.0
    regression_weight: float = 0.0  # DMD v1's lambda_reg = 0.25 (LPIPS there, L2 here); DMD2 drops it
    regression_pairs: int = 25_000  # DMD v1's precomputed (noise, teacher sample) pairs [recall]; used when weight > 0
    regression_teacher_steps: int = 100  # the teacher's ODE steps per pair, and its solver
    regression_solver: str = "euler"
    regression_seed: int = 0  # seed of the pairs' noise and labels
    init_from_teacher: bool = True  # start the generator and the fake score from the teacher's weights
    gan: bool = False  # DMD2's GAN term (a separate discriminator here, see the module docstring)
    gan_generator_weight: float = 3e-3  # gen_cls_loss_weight
    gan_discriminator_weight: float = 1e-2  # guidance_cls_loss_weight
    discriminator_width: int = 128

    def __post_init__(self):
        check_solver(self.regression_solver)
        for name in ("fake_updates", "num_train_timesteps", "discriminator_width", "regression_pairs",
                     "regression_teacher_steps"):
            value = getattr(self, name)
            least = 2 if name == "num_train_timesteps" else 1  # the Karras grid needs two levels
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise JumpflowError(f"{name} must be a positive integer (T >= 2), got {value!r}")
        if not (isinstance(self.fake_lr_scale, (int, float)) and self.fake_lr_scale > 0):
            raise JumpflowError(f"fake_lr_scale must be positive, got {self.fake_lr_scale!r}")
        if self.time_schedule not in TIME_SCHEDULES:
            raise JumpflowError(f"time_schedule must be one of {', '.join(TIME_SCHEDULES)}, "
                                f"got {self.time_schedule!r}")
        if not 0 <= self.min_step_percent < self.max_step_percent <= 1:
            raise JumpflowError(f"need 0 <= min_step_percent < max_step_percent <= 1, got "
                                f"{self.min_step_percent} and {self.max_step_percent}")
        if not 0 < self.sigma_min < self.sigma_max or not math.isfinite(self.sigma_max) or self.rho <= 0:
            raise JumpflowError(f"need 0 < sigma_min < sigma_max < inf and rho > 0, got sigma_min={self.sigma_min}, "
                                f"sigma_max={self.sigma_max}, rho={self.rho}")
        for name in ("regression_weight", "gan_generator_weight", "gan_discriminator_weight"):
            if not getattr(self, name) >= 0:
                raise JumpflowError(f"{name} must be >= 0, got {getattr(self, name)!r}")


class NoisyDiscriminator(nn.Module):
    """D(z_t, t) -> (B,) logit: a small MLP on flattened noisy samples and their time (the diffusion-GAN input)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                    nn.Linear(width, 1))

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        return self.layers(torch.cat([z.flatten(1), t[:, None].to(z.dtype)], 1)).squeeze(1)


@register
class DMD2(ScoreDistillation):
    """DMD2: a one-step generator pushed along the fake-minus-real score difference, with an online fake score."""

    name = "dmd2"
    paper = ("Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image Synthesis "
             "(arXiv 2405.14867); DMD: Yin et al. CVPR 2024 (arXiv 2311.18828)")
    Config = DMD2Config

    def __init__(self, net: nn.Module, config: DMD2Config, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self.discriminator = NoisyDiscriminator(math.prod(self.shape), config.discriminator_width) if config.gan \
            else None
        self.sigmas = karras_sigmas(config.num_train_timesteps, config.sigma_min, config.sigma_max, config.rho)

    # --- the teacher: DMD v1's regression pairs ------------------------------------------------------------------
    def attach_teacher(self, teacher, workspace: Path) -> None:
        super().attach_teacher(teacher, workspace)  # also starts generator and fake score from the teacher
        if self.config.regression_weight > 0:
            self.__dict__["_regression_pairs"] = self.regression_dataset(teacher)  # outside the saved state

    @torch.no_grad()
    def regression_dataset(self, teacher, chunk: int = 4096) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """DMD v1's fixed (noise, teacher ODE sample, labels) pairs, from their own seeded generator (so resume and
        every run of this config see the same pairs). (N, *shape), (N, *shape), (N,) or None."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.regression_seed)
        noise = torch.randn(cfg.regression_pairs, *self.shape, generator=generator)
        labels = (torch.randint(self.num_classes, (cfg.regression_pairs,), generator=generator)
                  if self.num_classes else None)
        noise = noise.to(teacher.device)
        labels = None if labels is None else labels.to(teacher.device)
        samples = torch.cat([teacher.sample(noise[i:i + chunk], cfg.regression_teacher_steps,
                                            None if labels is None else labels[i:i + chunk], cfg.regression_solver)
                             for i in range(0, noise.shape[0], chunk)])
        return noise, samples, labels

    def regression_batch(self, batch_size: int, device) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        noise, samples, labels = self.__dict__["_regression_pairs"]
        index = torch.randint(noise.shape[0], (batch_size,), device=noise.device)
        pick = lambda a: None if a is None else a[index].to(device)  # noqa: E731
        return pick(noise), pick(samples), pick(labels)

    def fake_parameters(self) -> List[nn.Parameter]:
        fake = list(self.fake_net.parameters())
        if self.discriminator is not None:
            fake += list(self.discriminator.parameters())  # the paper's classifier head trains with the fake score
        return fake

    # --- pieces -----------------------------------------------------------------------------------------------------
    def times(self, n: int, device, dtype) -> Tensor:
        """(n,) times in [t(0.02 T), t(0.98 T)]: a uniform index of the Karras grid mapped by t = sigma / (1 + sigma),
        or t ~ U[min_step_percent, max_step_percent]."""
        cfg = self.config
        if cfg.time_schedule == "uniform":
            return cfg.min_step_percent + (cfg.max_step_percent - cfg.min_step_percent) * torch.rand(n, device=device,
                                                                                                  dtype=dtype)
        low = int(cfg.min_step_percent * cfg.num_train_timesteps)
        high = max(int(cfg.max_step_percent * cfg.num_train_timesteps), low + 1)
        index = torch.randint(low, high, (n,)).clamp(max=cfg.num_train_timesteps - 1)
        return sigma_to_time(self.sigmas[index]).to(device, dtype)

    @torch.no_grad()
    def distribution_matching_gradient(self, x: Tensor, t: Tensor, noise: Tensor,
                                       labels: Optional[Tensor]) -> Tensor:
        """DMD's grad = (x_hat_fake - x_hat_real) / mean|x - x_hat_real| (per sample, NaN -> 0), shaped like x."""
        x = x.detach()
        z = interpolate(x, noise, t)
        real, fake = self.real_denoiser(z, t, labels), self.fake_denoiser(z, t, labels)  # x_hat = z_t - t v(z_t, t)
        normaliser = (x - real).abs().flatten(1).mean(1).view(-1, *([1] * (x.dim() - 1)))
        return torch.nan_to_num((fake - real) / normaliser)

    def discriminate(self, x: Tensor) -> Tensor:
        """D on x diffused to a random time (both real and generated samples are noised, as the diffusion GAN)."""
        t = self.times(x.shape[0], x.device, x.dtype)
        return self.discriminator(interpolate(x, torch.randn_like(x), t), t)

    # --- the two losses ---------------------------------------------------------------------------------------------
    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """The generator's loss: L_DM (+ DMD's regression, + the GAN's generator term)."""
        self.teacher  # raises "needs a teacher" before any work
        noise = torch.randn_like(x)
        sample = self.generate(noise, labels)
        t = self.times(x.shape[0], x.device, x.dtype)
        grad = self.distribution_matching_gradient(sample, t, torch.randn_like(x), labels)
        dm = 0.5 * F.mse_loss(sample.float(), (sample - grad).detach().float())  # d/dx = grad / numel
        loss, metrics = dm, {"dm": dm.detach(), "grad_norm_dm": grad.flatten(1).norm(dim=1).mean()}
        if self.config.regression_weight > 0:
            pair_noise, pair_sample, pair_labels = self.regression_batch(x.shape[0], x.device)
            regression = (self.generate(pair_noise.to(x.dtype), pair_labels) - pair_sample.to(x.dtype)).pow(2).mean()
            loss = loss + self.config.regression_weight * regression
            metrics["regression"] = regression.detach()
        if self.discriminator is not None:
            gan = F.softplus(-self.discriminate(sample)).mean()
            loss = loss + self.config.gan_generator_weight * gan
            metrics["gan"] = gan.detach()
        return LossOutput(loss, metrics)

    def fake_loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """Flow matching of the fake score on fresh, detached generator samples (+ the discriminator's loss)."""
        sample = self.fresh_sample(x, labels)
        out = self.fake_score_loss(sample, labels)
        if self.discriminator is not None:
            critic = (F.softplus(self.discriminate(sample)) + F.softplus(-self.discriminate(x))).mean()
            out.loss = out.loss + self.config.gan_discriminator_weight * critic
            out.metrics["discriminator"] = critic.detach()
        return out
