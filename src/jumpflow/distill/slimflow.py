"""SlimFlow: a small one-step student of a large flow, by Annealing Reflow then Flow-Guided Distillation.

Zhu, Liu, Liu 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow" (ECCV 2024,
arXiv 2407.12718); official code github.com/yuanzhi-zhu/SlimFlow. METHODS.md B2. Reflow and its one-step
distillation are Liu, Gong, Liu 2023 ("Flow Straight and Fast") and InstaFlow (jumpflow.distill.reflow).

A student smaller than its teacher cannot start from the teacher's weights, which reflow relies on, and training a
small 1-rectified flow first costs a whole extra run. SlimFlow does it in two stages:

Stage 1, Annealing Reflow (`slimflow`; paper Sec. 3.1, Eq. 9). Reflow on the teacher's pairs (z_1, x = ODE(z_1)),
but with the noise end annealed from independent noise to the teacher's coupled noise over training step k:
    z_1^beta = sqrt(1 - beta(k)^2) z_1 + beta(k) z_1',   z_1' ~ N(0, I) drawn afresh, independent of the pair
    L = E_t || v(z_t, t, t) - (z_1^beta - x) ||^2,       z_t = (1 - t) x + t z_1^beta
z_1^beta is N(0, I) for every beta (unit variance); beta = 1 is flow matching on the teacher's samples with
independent noise (a 1-rectified flow: the warm start), beta = 0 is reflow (the 2-rectified flow).
beta(k) = 1 - min(1, k / K) (linear: the paper's default, its Table 4 ablation; "cosine", (1 + cos(pi k/K)) / 2,
is the official code's alternative). The result is a velocity field, a teacher itself (Teacher.from_checkpoint).

Stage 2, Flow-Guided Distillation (`slimflow_distill`; Sec. 3.2, Eq. 8 and 11-13, Algorithm 1). A one-step map
G(z) = z - u(z, 1, 0) regresses the 2-rectified flow's ODE endpoints (the pair cache), plus a regulariser whose
targets are the frozen 2-rectified flow's 2-step Euler outputs through a random intermediate time t, computed
online on fresh noise eps (no ODE solve needed):
    x_t    = eps - (1 - t) w,          w = sg(u(eps, 1, 0)) (the student's own first step) or v(eps, 1) (the 2-RF's)
    target = x_t - t v(x_t, t)
    L = D(G(z_1), x) + lambda D(G(eps), target),  lambda = 1 (Eq. 13)
Eq. 12 as written takes the 2-RF's own first step (first_step="teacher": the target is then exactly its 2-step
output); the paper reports (Sec. 4.1) that the student's own first step saves a teacher call and works better, and
its code does that: the default, first_step="student". The student starts from the stage-1 model (same backbone).

Which details come from where (the paper's equations and tables as read in a summary of it, not in the PDF itself,
each checked against the official code; METHODS.md B2 had marked Eq. 9's form as recalled: it is confirmed):
- paper: Eq. 9's form, beta falling from 1 to 0; the linear schedule (Table 4: the best of its ablation); Eq. 13's
  D(G(z_1), x) + 1 * the 2-step term; the student's first step (Sec. 4.1); distillation on the 2-rectified flow's
  pairs, starting from it (Table 5).
- paper and code: K = 300,000 (Table 4's 6 x 50k; the README's Annealing Reflow command), of 800k iterations.
- code only: the cosine alternative; the regulariser's t ~ U[0.2, 0.8] (Eq. 12 writes the integral over [0, 1]:
  set guidance_t_min, guidance_t_max = 0, 1); fresh noise eps for the regulariser.
- jumpflow: K = 3/8 of the run when anneal_steps = 0 (300k of 800k; outside a Trainer, 300k); D is L2 or
  pseudo-Huber (the paper's best D is LPIPS, which jumpflow does not have); no horizontal-flip doubling of the
  pairs (it needs a flip-equivariant teacher and data: not the 2-D toys or the digits); reflow's t ~ U[0, 1] and the
  rest of flow matching's options; the student's size is the user's (the bench: BenchSpec.method_training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import LossOutput
from ..paths import expand_time
from .reflow import InstaFlow, InstaFlowConfig, Reflow, ReflowConfig

ANNEAL_SCHEDULES = ("linear", "cosine")
PAPER_ANNEAL_STEPS = 300_000  # beta reaches 0 here (Table 4; the README's x0_randomness warmup_300000)
PAPER_REFLOW_STEPS = 800_000  # the paper's Annealing Reflow iterations (Sec. 4.1)
FIRST_STEPS = ("student", "teacher")


def annealing_beta(step: int, anneal_steps: int, schedule: str = "linear") -> float:
    """beta(k): 1 at step 0, falling to 0 at step `anneal_steps` and staying there (a function of the step alone)."""
    if schedule not in ANNEAL_SCHEDULES:
        raise JumpflowError(f"unknown anneal_schedule {schedule!r}; valid: {', '.join(ANNEAL_SCHEDULES)}")
    progress = min(1.0, max(0, step) / anneal_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cos(pi) is exactly -1: beta is exactly 0 at the end


def annealed_noise(coupled: Tensor, independent: Tensor, beta: float) -> Tensor:
    """Eq. 9: sqrt(1 - beta^2) coupled + beta independent; N(0, I) when both are independent N(0, I)."""
    if not 0.0 <= beta <= 1.0:
        raise JumpflowError(f"beta must be in [0, 1], got {beta!r}")
    return math.sqrt(1.0 - beta * beta) * coupled + beta * independent


# --- stage 1: Annealing Reflow ------------------------------------------------------------------------------------
@dataclass
class SlimFlowConfig(ReflowConfig):
    anneal_steps: int = 0  # K, where beta reaches 0; 0 = 3/8 of the run (the paper's 300k of 800k)
    anneal_schedule: str = "linear"  # "linear" (the paper's) or "cosine" (the official code's alternative)
    init_from_teacher: bool = False  # the point of annealing: the small student starts from its own initialisation

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.anneal_steps, int) or isinstance(self.anneal_steps, bool) or self.anneal_steps < 0:
            raise JumpflowError(f"anneal_steps must be an integer >= 0 (0: 3/8 of the run), got {self.anneal_steps!r}")
        if self.anneal_schedule not in ANNEAL_SCHEDULES:
            raise JumpflowError(f"unknown anneal_schedule {self.anneal_schedule!r}; valid: "
                                f"{', '.join(ANNEAL_SCHEDULES)}")


@register
class SlimFlow(Reflow):
    """Annealing Reflow: reflow whose noise moves from independent to teacher-coupled, so a small net needs no start."""

    name = "slimflow"
    paper = ("Zhu, Liu, Liu 2024, SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow "
             "(ECCV 2024, arXiv 2407.12718)")
    Config = SlimFlowConfig

    def __init__(self, net, config, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        # Steps seen by `loss` in training mode; a buffer, so a checkpoint carries it and a resume keeps the schedule.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    def anneal_length(self) -> int:
        """K: the config's, else 3/8 of the planned run (the paper's 300k of 800k), else the paper's 300k."""
        if self.config.anneal_steps:
            return self.config.anneal_steps
        if self.planned_steps:
            return max(1, round(self.planned_steps * PAPER_ANNEAL_STEPS / PAPER_REFLOW_STEPS))
        return PAPER_ANNEAL_STEPS

    def beta(self, step: Optional[int] = None) -> float:
        """beta(k) at `step` (default: the current training step)."""
        step = int(self.training_step) if step is None else step
        return annealing_beta(step, self.anneal_length(), self.config.anneal_schedule)

    def pair_batch(self, batch_size: int, device) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The teacher's pairs with the noise annealed (Eq. 9) at the current step; reflow's loss trains on them."""
        noise, sample, labels = super().pair_batch(batch_size, device)
        beta = self.beta()
        if beta > 0:  # after annealing it is plain reflow: no independent noise to draw
            noise = annealed_noise(noise, torch.randn_like(noise), beta)
        return noise, sample, labels

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        beta = self.beta()
        out = super().loss(x, labels)  # L_FM on (annealed noise, teacher sample): the a-reflow loss
        if self.training:
            self.training_step += 1
        out.metrics["beta"] = torch.tensor(beta)
        return out


# --- stage 2: Flow-Guided Distillation ----------------------------------------------------------------------------
@dataclass
class SlimFlowDistillConfig(InstaFlowConfig):
    guidance_weight: float = 1.0  # lambda of the 2-step regulariser (Eq. 13: weight 1); 0 = plain distillation
    guidance_t_min: float = 0.2  # the regulariser's intermediate time t ~ U[t_min, t_max] [code: 0.2 to 0.8]
    guidance_t_max: float = 0.8
    first_step: str = "student"  # who moves eps to x_t: "student" (Sec. 4.1, the code) or "teacher" (Eq. 12)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.guidance_weight, (int, float)) and self.guidance_weight >= 0):
            raise JumpflowError(f"guidance_weight must be >= 0, got {self.guidance_weight!r}")
        if not 0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0:
            raise JumpflowError(f"need 0 <= guidance_t_min <= guidance_t_max <= 1, got {self.guidance_t_min!r}, "
                                f"{self.guidance_t_max!r}")
        if self.first_step not in FIRST_STEPS:
            raise JumpflowError(f"first_step must be one of {', '.join(FIRST_STEPS)}, got {self.first_step!r}")


@register
class SlimFlowDistill(InstaFlow):
    """Flow-Guided Distillation: one-step regression on the 2-rectified flow's pairs plus its online 2-step targets."""

    name = "slimflow_distill"
    paper = SlimFlow.paper
    Config = SlimFlowDistillConfig
    bench_teacher = "slimflow"  # the paper's recipe: distil the annealing-reflow model (the small 2-rectified flow)
    max_sample_steps = 1  # trained at (t, s) = (1, 0) only, like InstaFlow

    def one_step(self, noise: Tensor, labels: Optional[Tensor]) -> Tensor:
        """G(z_1) = z_1 - u(z_1, 1, 0), in float32."""
        ones = torch.ones(noise.shape[0], device=noise.device)
        return noise - self.net(noise, ones, 0 * ones, labels).float()

    def distance(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Per-sample D: mean squared error, or pseudo-Huber sqrt(|d|^2 + c^2) - c (c = 0.00054 sqrt(dim))."""
        squared = (prediction - target).pow(2).flatten(1).sum(1)
        dim = prediction[0].numel()
        if self.config.distance == "pseudo_huber":
            c = 0.00054 * dim ** 0.5
            return (squared + c * c).sqrt() - c
        return squared / dim

    def flow_guidance(self, eps: Tensor, labels: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(G(eps), its 2-step target) at t ~ U[guidance_t_min, guidance_t_max]; only G(eps) carries a gradient."""
        cfg = self.config
        t = cfg.guidance_t_min + (cfg.guidance_t_max - cfg.guidance_t_min) * torch.rand(eps.shape[0],
                                                                                      device=eps.device)
        prediction = self.one_step(eps, labels)
        first = (eps - prediction).detach() if cfg.first_step == "student" else None  # sg(u(eps, 1, 0))
        return prediction, self.guidance_target(eps, t, labels, first)

    @torch.no_grad()
    def guidance_target(self, noise: Tensor, t: Tensor, labels: Optional[Tensor],
                        first: Optional[Tensor] = None) -> Tensor:
        """The 2-step target (Eq. 12): x_t = eps - (1 - t) w, then x_t - t v(x_t, t) with the frozen teacher.

        `first` is w when it is the student's u(eps, 1, 0) (first_step="student"); None takes the teacher's
        v(eps, 1), and the target is then the teacher's own 2-step Euler output through t."""
        teacher = self.teacher
        if first is None:
            first = teacher.velocity(noise, torch.ones_like(t), labels).float()
        x_t = noise - expand_time(1 - t, noise) * first
        return x_t - expand_time(t, noise) * teacher.velocity(x_t, t, labels).float()

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        cfg = self.config
        noise, sample, pair_labels = self.pair_batch(x.shape[0], x.device)
        labels = self.drop_labels(pair_labels, cfg.class_dropout)
        distill = self.distance(self.one_step(noise, labels), sample).mean()  # L_distill (Eq. 8)
        metrics = {"distill": distill.detach()}
        loss = distill
        if cfg.guidance_weight > 0:
            eps = torch.randn_like(noise)  # fresh noise: the regulariser needs no ODE pairs
            guidance = self.distance(*self.flow_guidance(eps, labels)).mean()  # L_2-step (Eq. 11)
            loss = loss + cfg.guidance_weight * guidance  # Eq. 13
            metrics["guidance"] = guidance.detach()
        return LossOutput(loss, metrics)
