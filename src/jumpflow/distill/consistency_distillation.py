"""Consistency distillation (CD): a consistency function trained on a frozen teacher's probability-flow ODE.

Song, Dhariwal, Chen, Sutskever 2023, "Consistency Models" (ICML 2023, arXiv 2303.01469), Algorithm 2.
METHODS.md B3.

CD is consistency training (jumpflow.methods.consistency) with one change: the less noisy point of each pair is not
z_r = (1 - r) x + r eps on the same (x, eps), but the teacher's ODE step from the noisier point,

    z_t = (1 - t) x + t eps,  z_hat_r = Heun_teacher(z_t, t -> r),                                    (CM Alg. 2)
    L = E[ lambda(t_n) d( f_theta(z_t, t), f_theta-(z_hat_r, r) ) ],  t = t_{n+1}, r = t_n,  n ~ U{1, ..., N-1},
    theta- <- sg(mu theta- + (1 - mu) theta)                                                  (target network)

so the exact map to 0 of the TEACHER's flow is a fixed point of the loss up to the ODE step's error (no conditional
expectation involved, unlike CT), and the data x enters only through z_t (CD trains on real data).

jumpflow's choices, each against the paper:
- Parameterisation and sampler are consistency.py's: f(z_t, t) = z_t - t net(z_t, t, 0), so f(x, 0) = x holds for any
  net; multistep sampling is CM Algorithm 1 on consistency.py's schedule (1 step from sigma_max, 2 steps via 0.821).
- Grid: the paper's N = 18 EDM noise levels sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) -
  sigma_min^(1/rho)))^rho, rho = 7, sigma in [0.002, 80], mapped to jumpflow time by equal SNR, t = sigma / (1 + sigma)
  (t from 0.002 to 0.988). Same SNR levels as the paper, so N keeps its meaning; the grid is fine near the data (the
  first steps are 0.005, 0.015 in t), coarsest mid-path (0.15 around t = 0.3-0.6) and fine again near t = 1 where the
  linear path's ODE is nearly straight. Its top, t(80), is exactly where the 1-step sampler starts.
- The teacher's Heun step is taken in jumpflow's time t (Teacher.ode_step), not in sigma: both are 2nd-order
  discretisations of the same ODE (z_t = x_sigma / (1 + sigma)), with different O(h^3) errors.
- Target network theta-: the paper keeps TWO averages, theta- (mu = 0.95 on CIFAR-10) for the target and a slow EMA
  (0.9999) for evaluation. jumpflow's Trainer owns the slow one (TrainConfig.ema_decay, what samples and is exported);
  theta- is this method's own copy of the student, `target_net`, a registered submodule so that checkpoints save it
  and resume restores it, updated with `target_ema` (mu) once per training step. (Method.ema_net would tie the target
  to ema_decay = 0.999, a ~1000-step lag instead of the paper's ~20.) target_ema = 0 uses sg(theta) itself, no copy.
  The update for step k runs at the start of step k's loss, i.e. right after step k-1's optimizer step: the paper's
  order, and a resumed run does the same update from the same weights.
- Metric: d = squared L2 (averaged over dimensions; Adam ignores the constant) or iCT's pseudo-Huber; the paper's best,
  LPIPS, needs an image network jumpflow does not have. lambda(t_n) = 1 as in the paper.
- The student starts from the teacher's weights (the paper's CD init) when the backbones match. A flow-matching
  teacher only ever saw s = t, so net(z, t, 0) starts as its velocity up to the untrained gap embedding of t - s = t:
  f starts near z - t v(z, t) = E[x | z_t], the paper's start (its F is the teacher's denoiser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import EMATargetNet, LossOutput
from ..methods.consistency import (ConsistencyTraining, _same_randomness, consistency_function, pseudo_huber,
                                   sigma_to_time)
from ..paths import interpolate
from .pair_method import PairDistillation
from .teacher import check_solver

DISTANCES = ("l2", "pseudo_huber")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """(n,) increasing EDM noise levels sigma_1 = sigma_min < ... < sigma_n = sigma_max (Karras et al. 2022, eq. 5;
    CM §5), float64 on the CPU."""
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i * (hi - lo)) ** rho


@dataclass
class ConsistencyDistillationConfig:
    """CM's CD recipe for CIFAR-10 (paper, Table 3 and §5; METHODS.md B3 marks them [recall])."""

    discretisation: int = 18  # N: noise levels of the grid (N - 1 teacher steps span it)
    sigma_min: float = 0.002  # EDM noise range; t from 0.002 to 0.988. 0 anchors the lowest target at t = 0 exactly
    sigma_max: float = 80.0  # also where 1-step sampling starts
    rho: float = 7.0  # Karras grid exponent
    teacher_solver: str = "heun"  # the paper's ODE step; "euler" for a cheaper (1 NFE), 1st-order target
    target_ema: float = 0.95  # mu of the target network theta-; 0 = sg(theta) itself
    distance: str = "l2"  # "l2" (squared, the paper's L2 metric) or "pseudo_huber" (iCT, c = huber_scale sqrt(dim))
    huber_scale: float = 0.00054
    two_step_sigma: float = 0.821  # intermediate sigma of the 2-step sampler (t = 0.451), as consistency.py
    class_dropout: float = 0.0  # the paper distils without guidance; > 0 also trains the null label (teacher too)
    init_from_teacher: bool = True  # start the student (and theta-) from the teacher's weights when the backbones match

    def __post_init__(self):
        if isinstance(self.discretisation, bool) or not isinstance(self.discretisation, int) or self.discretisation < 2:
            raise JumpflowError(f"discretisation (N noise levels) must be an integer >= 2, got {self.discretisation!r}")
        if not 0 <= self.sigma_min < self.sigma_max or not math.isfinite(self.sigma_max):
            raise JumpflowError(f"need 0 <= sigma_min < sigma_max < inf, got sigma_min={self.sigma_min}, "
                                f"sigma_max={self.sigma_max}")
        if self.rho <= 0:
            raise JumpflowError(f"rho must be positive, got {self.rho}")
        check_solver(self.teacher_solver)
        if not 0 <= self.target_ema < 1:
            raise JumpflowError(f"target_ema (mu) must be in [0, 1), got {self.target_ema}")
        if self.distance not in DISTANCES:
            raise JumpflowError(f"distance must be one of {', '.join(DISTANCES)} (no LPIPS network in jumpflow), "
                                f"got {self.distance!r}")
        if self.huber_scale < 0:
            raise JumpflowError(f"huber_scale must be >= 0, got {self.huber_scale}")
        if not 0 < self.two_step_sigma < self.sigma_max:
            raise JumpflowError(f"need 0 < two_step_sigma < sigma_max, got two_step_sigma={self.two_step_sigma}, "
                                f"sigma_max={self.sigma_max}")
        if not 0 <= self.class_dropout < 1:
            raise JumpflowError(f"class_dropout must be in [0, 1), got {self.class_dropout}")


@register
class ConsistencyDistillation(EMATargetNet, ConsistencyTraining):
    """Consistency distillation: f_theta at t_{n+1} matches the target net at the teacher's Heun step to t_n."""

    name = "consistency_distillation"
    kind = "distillation"
    needs_teacher = True
    paper = "Song, Dhariwal, Chen, Sutskever 2023, Consistency Models (arXiv 2303.01469), Alg. 2"
    Config = ConsistencyDistillationConfig

    def __init__(self, net: nn.Module, config: ConsistencyDistillationConfig, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        # theta-: a frozen copy, saved with the method's state (checkpoints, exact resume); None -> sg(theta).
        self.make_target_net(net)
        self.sigmas = karras_sigmas(config.discretisation, config.sigma_min, config.sigma_max, config.rho)  # (N,)

    def check_config(self) -> None:
        """Validated by ConsistencyDistillationConfig.__post_init__."""

    # --- the teacher and the target network --------------------------------------------------------------------
    def attach_teacher(self, teacher, workspace: Path) -> None:
        super().attach_teacher(teacher, workspace)
        if self.config.init_from_teacher:
            PairDistillation.start_from(self, teacher)  # the paper initialises the student from the teacher
        self.reset_target()  # theta- <- theta (a resume then restores theta- from the checkpoint)

    @torch.no_grad()
    def reset_target(self) -> None:
        if self.target_net is not None:
            self.target_net.load_state_dict(self.net.state_dict())

    # --- training -----------------------------------------------------------------------------------------
    def noise_levels(self, n: int, step: int) -> Tuple[Tensor, Tensor]:
        """(sigma_{n+1}, sigma_n) for n ~ U{1, ..., N-1}: adjacent grid levels, (n,) float64 on the CPU."""
        i = torch.randint(self.config.discretisation - 1, (n,))
        return self.sigmas[i + 1], self.sigmas[i]

    def huber_c(self) -> float:
        return self.config.huber_scale * math.sqrt(math.prod(self.shape))

    def distillation_pair(self, x: Tensor, noise: Tensor, t: Tensor, r: Tensor,
                          labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(f_theta(z_t, t) with its graph, sg f_theta-(z_hat_r, r)) with z_t = (1 - t) x + t eps and z_hat_r the
        teacher's one `teacher_solver` step from (z_t, t) to r < t. x, noise: (B, *shape); t, r: (B,)."""
        target_net = self.target_net if self.target_net is not None else self.net
        z_t = interpolate(x, noise, t)
        z_hat = self.teacher.ode_step(z_t, t, r, labels, self.config.teacher_solver).to(x.dtype)
        # The target first, under a forked RNG, so the student draws the same dropout mask (as consistency.py).
        with _same_randomness(x.device), torch.no_grad():
            target = consistency_function(target_net, z_hat, r, labels)
        prediction = consistency_function(self.net, z_t, t, labels)
        return prediction, target.detach()

    def distance(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Per-sample d: squared L2 averaged over dimensions, or pseudo-Huber. (B, *shape) x 2 -> (B,)."""
        if self.config.distance == "pseudo_huber":
            return pseudo_huber(prediction, target, self.huber_c())
        return (prediction - target).pow(2).flatten(1).mean(1)

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        sigma_t, sigma_r = self.noise_levels(x.shape[0], int(self.training_step))
        t = sigma_to_time(sigma_t).to(x.device, x.dtype)  # student time t_{n+1}
        r = sigma_to_time(sigma_r).to(x.device, x.dtype)  # teacher's step ends at t_n
        labels = self.drop_labels(labels, self.config.class_dropout)
        prediction, target = self.distillation_pair(x, torch.randn_like(x), t, r, labels)
        distance = self.distance(prediction, target)
        loss = distance.mean()  # lambda(t_n) = 1
        if self.training:
            self.training_step += 1
        return LossOutput(loss, {"distance": distance.detach().mean(), "gap": (t - r).detach().mean()})
