"""SIM: Score Implicit Matching, a one-step generator trained on a general score divergence to the teacher.

Luo, Huang, Geng, Kolter, Qi 2024, "One-Step Diffusion Distillation through Score Implicit Matching" (NeurIPS 2024,
arXiv 2410.16794). METHODS.md B7.

SIM minimises D(theta) = int w(t) E_{x_t ~ pi_t} d(y_t(x_t)) dt, y_t = s_theta,t - s_real,t, for a distance d and a
sampling distribution pi_t = p_theta,t whose own dependence on theta is not differentiated (stop-gradient). The
generator's score s_theta is unknown, but the gradient is not (the paper's score-gradient theorem; re-derived here):
with u = d'(y),

    int pi u^T d_theta s_theta  =  - int d_theta p_theta [div u + u^T s_theta]           (integration by parts)
    E_{x_t | x_0}[div u(x_t)]   =  - E_{x_t | x_0}[u(x_t)^T grad log q_t(x_t | x_0)]     (Gaussian kernel, any u)

so grad D = grad_theta E_{x_0 = G_theta(eps), x_t | x_0}[ -u(x_t)^T (s_theta(x_t) - grad log q_t(x_t | x_0)) ],
u and s_theta held as fixed functions (s_theta -> the online fake score s_psi) but differentiated through x_0 and x_t,
u included. On jumpflow's path s(z) = -(z - (1 - t) x_hat) / t^2, so with the denoisers f_phi (teacher), f_psi (fake)

    s_psi - s_real = (1 - t) / t^2 (f_psi - f_phi),   s_psi - grad log q(z | x_g) = (1 - t) / t^2 (f_psi - x_g).

jumpflow applies d to the denoiser difference f_psi - f_phi (the score difference rescaled per time, itself a SIM
distance) and folds (1 - t) / t^2 into w(t); with Delta = f_phi - f_psi the per-sample loss is

    pseudo-Huber d(y) = sqrt(|y|^2 + c^2) - c:  L = w Delta . (f_psi - x_g) / sqrt(|Delta|^2 + c^2)   (the paper's d)
    squared L2   d(y) = |y|^2 ("l2"):          L = 2 w Delta . (f_psi - x_g)   = 2 x SiD's term at alpha = 1.

The paper's: the divergence, the theorem, the pseudo-Huber distance (its recommendation), the online fake score
trained by denoising on generator samples, a generator that reads noise at sigma_init = 2.5 (its released inference
code) as SiD's, whose code it builds on.
jumpflow's choices (the paper's training code is not public, so these could not be checked against it):
- w(t) = 1 / sg mean|x_g - f_phi| per sample, SiD's normalisation, and SiD's noise levels for both losses, its
  generator parameterisation and its flow-matching fake score (see sid.py);
- c = huber_c sqrt(dim): the distance acts on a sum over dims, so c scales like its root (as iCT's pseudo-Huber).

As SiD's, its 1:1 fake-score updates need a small lr: at the digits bench's 5e-4 it collapses to one digit (1-step
FD 67.7); lr 5e-5 or `fake_updates=5` trains it (BENCHMARKS.md, sid.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..errors import JumpflowError
from ..methods import register
from .sid import ScoreIdentityConfig, SiD

DISTANCES = ("pseudo_huber", "l2")


@dataclass
class SIMConfig(ScoreIdentityConfig):
    """SIM with the pseudo-Huber distance; SiD's generator, noise levels and 1:1 updates (see the module docstring)."""

    distance: str = "pseudo_huber"  # d(y): "pseudo_huber" sqrt(|y|^2 + c^2) - c, or "l2" |y|^2 (squared)
    huber_c: float = 0.1  # c = huber_c * sqrt(dim), on the denoiser difference in model space

    def __post_init__(self):
        super().__post_init__()
        if self.distance not in DISTANCES:
            raise JumpflowError(f"distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if not (isinstance(self.huber_c, (int, float)) and 0 < self.huber_c < math.inf):
            raise JumpflowError(f"huber_c must be positive and finite, got {self.huber_c!r}")


@register
class SIM(SiD):
    """SIM: a one-step generator trained on a general score divergence, its gradient from the online fake score."""

    name = "sim"
    paper = ("Luo, Huang, Geng, Kolter, Qi 2024, One-Step Diffusion Distillation through Score Implicit Matching "
             "(NeurIPS 2024, arXiv 2410.16794)")
    Config = SIMConfig

    def generator_terms(self, sample: Tensor, real: Tensor, fake: Tensor) -> Tensor:
        """(B,) -d'(f_psi - f_phi) . (f_psi - x_g): the score-gradient theorem's integrand in denoiser units."""
        gap = (real - fake).flatten(1)  # Delta = f_phi - f_psi = -(y), so -d'(y) = d'(Delta) for a symmetric d
        inner = (gap * (fake - sample).flatten(1)).sum(1)
        if self.config.distance == "l2":
            return 2 * inner
        c = self.config.huber_c * math.sqrt(gap.shape[1])
        return inner / (gap.pow(2).sum(1) + c * c).sqrt()
