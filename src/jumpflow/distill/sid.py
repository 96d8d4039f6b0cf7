"""SiD: Score identity Distillation of a teacher into a one-step generator, with an online fake score.

Zhou, Zheng, Wang, Yin, Huang 2024, "Score identity Distillation: Exponentially Fast Distillation of Pretrained
Diffusion Models for One-Step Generation" (ICML 2024, arXiv 2404.04057). METHODS.md B6.

SiD minimises the Fisher divergence between the teacher's noised data and the generator's noised samples. Written
with denoisers f (f_phi the teacher's, f_psi the fake score's) and rearranged by Tweedie's score identity so that the
generator's own (unknown) score appears only through the fake one, its generator loss is (the paper's L2 - alpha L1,
as its code computes it):

    x_g = G_theta(sigma_init eps),  x_t = x_g + sigma n
    L_G = sum_dims (f_phi - f_psi) * [(f_phi - x_g) - alpha (f_phi - f_psi)] / sg mean_dims |x_g - f_phi|

with gradients through x_g AND through f_phi(x_t), f_psi(x_t) via x_t (unlike DMD's stop-gradient); alpha = 1.2.
For an exact fake score, alpha = 0.5 gives the Fisher divergence's whole gradient and alpha = 1 drops the part that
comes from the samples' own distribution (SIM with the squared distance, see sim.py). The fake score learns p_theta's
denoiser online, one update per generator update, at the same lr.

In jumpflow's time (t = sigma / (1 + sigma), z_t = x_sigma / (1 + sigma), the same signal-to-noise ratio) the
denoisers are x_hat(z_t) = z_t - t v(z_t, t); as functions of x_g they are the EDM ones, gradients included.

The paper's choices, kept: sigma_init = 2.5; the generator loss's noise levels sigma = Karras(u), u ~ U[0, t_max/T],
t_max = 800 of T = 1000, counted from sigma_min (the code's `(1 - rnd_t)` ramp: sigma in [0.002, 24.4], t in
[0.002, 0.961]; the highest noise levels are left out); the fake score's sigma ~ LogNormal(-1.2, 1.2), i.e.
t = sigmoid(-1.2 + 1.2 n) (logit-normal); alpha = 1.2; fake updates 1:1; the same lr for both networks; the sum over
dims and mean over the batch, normalised per sample by sg mean|x_g - f_phi| (floored at 1e-5, as the code).

jumpflow's choices:
- The generator reads pure noise at sigma_init: z = t_init eps at t_init = sigma_init / (1 + sigma_init) = 0.714 and
  jumps to data with its flow-map head, x_g = z - t_init net(z, t_init, 0) (`sigma_init` sets it). The paper's
  generator starts as the teacher's denoiser at sigma_init, z - t_init net(z, t_init, t_init) for a flow-matching
  teacher; jumpflow reads the s = 0 head, as DMD2 here, so that what is trained and sampled is a jumpflow flow map
  (it starts from the teacher's weights, but its s = 0 output is not the teacher's denoiser).
- The fake score's loss is flow matching (velocity MSE) on those times, not EDM's weighted denoising loss: the same
  minimiser (p_theta's denoiser) at every time, another weighting across times.
- No loss scale (the code's 100 guards fp16 underflow; AdamW does not see the scale) and no dropping of NaN samples
  (the Trainer stops with its divergence error instead).

The 1:1 alternation needs a small learning rate (the paper's Adam lr is 1e-5 for both networks): at the benches'
shared lr (5e-4 on digits, 2e-3 on the toys) the generator outruns its fake score and collapses (digits: every sample
the same digit, 1-step FD 52.6). With `fake_updates=5` (DMD2's two-time-scale rule) the same recipe trains: digits
FD 1.0-1.2, the checkerboard SW2 0.048 (BENCHMARKS.md); so does the 1:1 rule at a tenth of the lr (digits, lr 5e-5:
FD 0.60, the teacher's level). So train with a small lr, or raise `fake_updates`; the default stays the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import LossOutput
from ..methods.consistency import sigma_to_time
from ..paths import interpolate
from .score_distillation import ScoreDistillation

NORMALISER_FLOOR = 1e-5  # the code's clip of mean|x_g - f_phi|


@dataclass
class ScoreIdentityConfig:
    """What SiD and SIM share: the generator's input noise, the noise levels of both losses, the two optimizers."""

    sigma_init: float = 2.5  # the generator's input noise level (t_init = sigma_init / (1 + sigma_init))
    t_max: int = 800  # generator loss: sigma = Karras(u), u ~ U[0, t_max / T] from the sigma_min end
    num_train_timesteps: int = 1000  # T
    sigma_min: float = 0.002  # EDM's noise levels
    sigma_max: float = 80.0
    rho: float = 7.0
    fake_p_mean: float = -1.2  # fake score: log sigma ~ N(P_mean, P_std^2), i.e. t = sigmoid(P_mean + P_std n)
    fake_p_std: float = 1.2
    fake_updates: int = 1  # fake-score updates per generator update
    fake_lr_scale: float = 1.0  # fake-score lr / generator lr
    init_from_teacher: bool = True  # start the generator and the fake score from the teacher's weights

    def __post_init__(self):
        for name in ("fake_updates", "num_train_timesteps", "t_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JumpflowError(f"{name} must be a positive integer, got {value!r}")
        if self.t_max > self.num_train_timesteps:
            raise JumpflowError(f"t_max must be <= num_train_timesteps, got {self.t_max} > {self.num_train_timesteps}")
        for name in ("sigma_init", "fake_lr_scale", "fake_p_std", "rho"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise JumpflowError(f"{name} must be positive and finite, got {value!r}")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise JumpflowError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={self.sigma_min}, "
                                f"sigma_max={self.sigma_max}")
        if not math.isfinite(self.fake_p_mean):
            raise JumpflowError(f"fake_p_mean must be finite, got {self.fake_p_mean!r}")


@dataclass
class SiDConfig(ScoreIdentityConfig):
    """SiD's CIFAR-10 / ImageNet-64 recipe (paper §4 and its code's defaults; METHODS.md B6)."""

    alpha: float = 1.2  # L_G = L2 - alpha L1 in the paper's notation

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise JumpflowError(f"alpha must be a finite number, got {self.alpha!r}")


def karras_sigma(u: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The Karras et al. 2022 (eq. 5) noise level at ramp position u in [0, 1] (u = 0: sigma_min, 1: sigma_max)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + u * (hi - lo)) ** rho


@register
class SiD(ScoreDistillation):
    """SiD: a one-step generator trained on the score-identity form of the Fisher divergence to the teacher."""

    name = "sid"
    paper = ("Zhou, Zheng, Wang, Yin, Huang 2024, Score identity Distillation: Exponentially Fast Distillation of "
             "Pretrained Diffusion Models for One-Step Generation (ICML 2024, arXiv 2404.04057)")
    Config = SiDConfig

    @property
    def generator_time(self) -> float:
        return self.config.sigma_init / (1 + self.config.sigma_init)  # t_init: pure noise at sigma_init

    def times(self, n: int, device, dtype) -> Tensor:
        """(n,) generator-loss times: t(sigma) for sigma = Karras(u), u ~ U[0, t_max / T]."""
        cfg = self.config
        u = torch.rand(n, device=device, dtype=torch.float64) * (cfg.t_max / cfg.num_train_timesteps)
        return sigma_to_time(karras_sigma(u, cfg.sigma_min, cfg.sigma_max, cfg.rho)).to(dtype)

    def fake_times(self, n: int, device, dtype) -> Tensor:
        """(n,) fake-score times: sigma = exp(P_mean + P_std n) is t = sigma / (1 + sigma) = sigmoid(log sigma)."""
        cfg = self.config
        return torch.sigmoid(cfg.fake_p_mean + cfg.fake_p_std * torch.randn(n, device=device, dtype=dtype))

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """The generator's loss, differentiated through x_g and through both denoisers via z_t."""
        self.teacher  # raises "needs a teacher" before any work
        sample = self.generate(torch.randn_like(x), labels)  # x_g, (B, *shape)
        t = self.times(x.shape[0], x.device, x.dtype)
        z = interpolate(sample, torch.randn_like(x), t)
        real, fake = self.real_denoiser(z, t, labels), self.fake_denoiser(z, t, labels)  # f_phi, f_psi
        loss = (self.weight(sample, real) * self.generator_terms(sample, real, fake)).mean()
        gap = (real - fake).detach().flatten(1).norm(dim=1).mean()
        return LossOutput(loss, {"generator": loss.detach(), "score_gap": gap})

    def weight(self, sample: Tensor, real: Tensor) -> Tensor:
        """(B,) 1 / sg mean_dims |x_g - f_phi|: SiD's per-sample normalisation (DMD's, on the generator's loss)."""
        return 1 / (sample - real).detach().abs().flatten(1).mean(1).clamp_min(NORMALISER_FLOOR)

    def generator_terms(self, sample: Tensor, real: Tensor, fake: Tensor) -> Tensor:
        """(B,) sum_dims (f_phi - f_psi) [(f_phi - x_g) - alpha (f_phi - f_psi)]  (SiD's L2 - alpha L1)."""
        gap = real - fake
        return (gap * ((real - sample) - self.config.alpha * gap)).flatten(1).sum(1)
