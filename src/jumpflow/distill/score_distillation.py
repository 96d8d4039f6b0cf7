"""What DMD2, SiD and SIM share: a one-step generator trained against a frozen teacher and an online fake score.

All three distil a teacher into a generator G_theta by matching the scores of the generator's noised samples to the
teacher's; the score of the generator's own distribution is estimated by a second network trained online on fresh
generator samples (DMD: Yin et al. 2024, arXiv 2311.18828; SiD: Zhou et al. 2024, arXiv 2404.04057; SIM: Luo et al.
2024, arXiv 2410.16794; METHODS.md B5-B7). They differ only in the generator's loss and their time draws.

Shared here, in jumpflow's convention (t = 0 data, t = 1 noise, z_t = (1 - t) x + t n):
- the generator reads noise at `generator_time` t_g and jumps to data with its flow-map head,
      z = t_g eps,  G(eps) = z - t_g net(z, t_g, 0)              (t_g = 1 for DMD2: G(eps) = eps - net(eps, 1, 0));
- the fake score `fake_net` (the student's architecture, its own optimizer "fake", lr x fake_lr_scale), trained by
  flow matching on fresh, detached generator samples, ||v_fake(z_t, t) - (n - sg x)||^2: its minimiser is the
  velocity of p_fake, hence its denoiser x_hat = z_t - t v (the same minimiser as EDM's weighted denoising loss);
- both networks start from the teacher's weights (init_from_teacher), as in all three papers;
- `fake_updates` fake-score updates before each generator update (DMD2's two-time-scale rule; 1 for SiD and SIM);
- denoisers of the teacher and the fake score that stay differentiable in their input (SiD and SIM backpropagate
  through them via z_t) while neither network's weights receive gradients from the generator's loss;
- sampling: one step only; the generator is trained at t_g alone, so a chain of jumps would leave its training
  distribution.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..methods.base import LossOutput, Method
from ..paths import expand_time, interpolate
from .pair_method import PairDistillation


class ScoreDistillation(Method):
    """Base of one-step score distillation: the generator, the online fake score and the Trainer's hooks.

    Subclasses give `loss` (the generator's), `times` (the generator loss's time draw) and may override
    `fake_times` (the fake score's, default: `times`) and `generator_time`. Their config needs `fake_updates`,
    `fake_lr_scale` and `init_from_teacher`."""

    kind = "distillation"
    needs_teacher = True
    default_sample_steps = 1
    bench_steps = (1,)
    max_sample_steps = 1

    def __init__(self, net: nn.Module, config, shape: tuple, num_classes: int = 0):
        super().__init__(net, config, shape, num_classes)
        self.fake_net = copy.deepcopy(net)  # the fake score: the student's architecture, its own optimizer

    @property
    def generator_time(self) -> float:
        """t_g: the time at which the generator reads its noise (z = t_g eps)."""
        return 1.0

    # --- the teacher: the real score, and the start of both networks ------------------------------------------------
    def attach_teacher(self, teacher, workspace: Path) -> None:
        super().attach_teacher(teacher, workspace)
        if self.config.init_from_teacher and teacher.net is not None:
            PairDistillation.start_from(self, teacher)  # generator and fake score both start from the teacher
            self.fake_net.load_state_dict(self.net.state_dict())  # (the student's own start if no match)

    # --- the Trainer's hooks: two optimizers, fake-score updates before each generator update -----------------------
    def fake_parameters(self) -> List[nn.Parameter]:
        """What the "fake" optimizer updates."""
        return list(self.fake_net.parameters())

    def optimizers(self) -> Dict[str, Tuple[List[nn.Parameter], float]]:
        return {"net": (self.trainable_parameters(), 1.0),
                "fake": (self.fake_parameters(), float(self.config.fake_lr_scale))}

    def updates(self, step: int) -> Sequence[str]:
        return ("fake",) * self.config.fake_updates + ("net",)

    def update_loss(self, name: str, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        if name == "fake":
            return self.fake_loss(x, labels)
        if name == "net":
            return self.loss(x, labels)
        raise JumpflowError(f"{self.name} has optimizers net and fake, not {name!r}")

    # --- pieces -----------------------------------------------------------------------------------------------------
    def times(self, n: int, device, dtype) -> Tensor:
        """(n,) times of the generator's loss."""
        raise NotImplementedError

    def fake_times(self, n: int, device, dtype) -> Tensor:
        """(n,) times of the fake score's flow-matching loss (default: those of the generator's loss)."""
        return self.times(n, device, dtype)

    def generate(self, noise: Tensor, labels: Optional[Tensor], net: Optional[nn.Module] = None) -> Tensor:
        """G(eps) = z - t_g net(z, t_g, 0) with z = t_g eps: the one-step flow-map jump from t_g to data."""
        net = self.net if net is None else net
        t_g = self.generator_time  # (multiplying by t_g = 1 is exact: DMD2's G(eps) = eps - net(eps, 1, 0))
        z = t_g * noise
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        return z - t_g * net(z, t_g * ones, 0 * ones, labels).to(noise.dtype)

    def real_denoiser(self, z: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """The teacher's x_hat = z_t - t v(z_t, t), differentiable in z (Teacher.velocity runs under no_grad, so the
        teacher's own velocity function is called; its weights are frozen)."""
        v = self.teacher.velocity_fn(z, t, labels).to(z.dtype)
        return z - expand_time(t, z) * v

    def fake_denoiser(self, z: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """The fake score's x_hat = z_t - t v_fake(z_t, t), differentiable in z but not in the fake net's weights
        (they are read detached: the generator's loss must not train the fake score)."""
        frozen = {name: p.detach() for name, p in self.fake_net.named_parameters()}
        v = torch.func.functional_call(self.fake_net, frozen, (z, t, t, labels)).to(z.dtype)
        return z - expand_time(t, z) * v

    # --- the fake score's loss --------------------------------------------------------------------------------------
    def fresh_sample(self, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        """A new, detached batch of generator samples shaped like x (the fake score must follow the current G)."""
        with torch.no_grad():
            return self.generate(torch.randn_like(x), labels)

    def fake_loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """Flow matching of the fake score on fresh, detached generator samples."""
        return self.fake_score_loss(self.fresh_sample(x, labels), labels)

    def fake_score_loss(self, sample: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """||v_fake(z_t, t) - (n - x)||^2 on the generator's samples x (mean over batch and dims)."""
        noise = torch.randn_like(sample)
        t = self.fake_times(sample.shape[0], sample.device, sample.dtype)
        v = self.fake_net(interpolate(sample, noise, t), t, t, labels)
        fit = (v.float() - (noise - sample).float()).pow(2).mean()
        return LossOutput(fit, {"fit": fit.detach()})

    # --- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net: Optional[nn.Module] = None,
               **options) -> Tensor:
        self.check_steps(steps)
        if steps != 1:
            raise JumpflowError(f"{self.name} is trained for one step (t = {self.generator_time:g} to 0) only; "
                                f"got steps={steps!r}")
        if options:
            raise JumpflowError(f"{self.name} sampling takes no option(s) {', '.join(sorted(options))}")
        return self.generate(noise, labels, net)
