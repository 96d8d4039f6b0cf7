"""Meta's `flow_matching` package (facebookresearch/flow_matching, PyPI `flow-matching`) as a jumpflow method.

Lipman et al. 2023, "Flow Matching for Generative Modeling"; Lipman et al. 2024, "Flow Matching Guide and Code".
Training uses their AffineProbPath with the CondOT scheduler, sampling their ODESolver (torchdiffeq fixed-grid
solvers). Only the glue to jumpflow's backbone and time convention is ours:

    their t = 1 - jumpflow's t   (theirs: x_0 = noise at t = 0, x_1 = data at t = 1; ours: data at 0, noise at 1)
    their velocity = -jumpflow's velocity   (d/dt of the same path with time reversed)

The package is CC BY-NC licensed and optional: install it with `pip install 'jumpflow[peers]'`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from ..methods import register
from ..methods.base import LossOutput, Method

# torchdiffeq's fixed-grid solvers that ODESolver accepts, with network evaluations per step.
SOLVER_NFE = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}


@dataclass
class FacebookFlowMatchingConfig:
    solver: str = "euler"  # a torchdiffeq fixed-grid method: euler, midpoint, heun2, heun3, rk4
    class_dropout: float = 0.0  # share of labels replaced by the null label, for classifier-free guidance


def theirs() -> SimpleNamespace:
    """Import the package on demand, so jumpflow works without it until this peer is built."""
    try:
        import flow_matching  # noqa: F401  # imported first: a missing package fails here, not on a cached submodule
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper
    except ImportError as e:
        raise JumpflowError(f"peer.facebook_flow_matching needs Meta's flow_matching package ({e}); "
                            f"install it with: pip install 'jumpflow[peers]'") from e
    return SimpleNamespace(AffineProbPath=AffineProbPath, CondOTScheduler=CondOTScheduler, ODESolver=ODESolver,
                           ModelWrapper=ModelWrapper)


@functools.lru_cache(maxsize=None)
def velocity_model_class(model_wrapper: type) -> type:
    """Their ModelWrapper around a jumpflow backbone, converting time and velocity sign (built once, lazily)."""

    class JumpflowVelocity(model_wrapper):
        def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
            # ODESolver passes one scalar time; our backbones take per-sample times (B,), s == t: instantaneous.
            t_ours = (1 - t).to(x.dtype).expand(x.shape[0])
            return -self.model(x, t_ours, t_ours, labels)  # d/d(their t) = -d/d(our t)

    return JumpflowVelocity


@register
class FacebookFlowMatching(Method):
    """Meta's flow_matching package (AffineProbPath + CondOT, ODESolver) on jumpflow's backbone and trainer."""

    name = "peer.facebook_flow_matching"
    kind = "peer"
    paper = ("Lipman et al. 2023, Flow Matching for Generative Modeling (arXiv 2210.02747); "
             "package facebookresearch/flow_matching (PyPI flow-matching)")
    requires: ClassVar[str] = "flow-matching"  # the pip package this peer runs
    Config = FacebookFlowMatchingConfig
    default_sample_steps = 100
    bench_steps = (1, 2, 10, 100)  # measured like jumpflow's flow_matching, its counterpart

    def __init__(self, net, config, shape, num_classes=0):
        super().__init__(net, config, shape, num_classes)
        self.check_solver(config.solver)
        self.theirs = theirs()
        self.path = self.theirs.AffineProbPath(scheduler=self.theirs.CondOTScheduler())

    @staticmethod
    def check_solver(solver: str) -> None:
        if solver not in SOLVER_NFE:
            raise JumpflowError(f"unknown solver {solver!r}; valid: {', '.join(SOLVER_NFE)}")

    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        # Same draws in the same order as jumpflow's flow_matching (noise, then t), so seeded runs see equal batches.
        noise = torch.randn_like(x)
        t = torch.rand(x.shape[0], device=x.device)  # jumpflow time, uniform
        path_sample = self.path.sample(x_0=noise, x_1=x, t=1 - t)  # their time: 1 - t
        velocity = self.net(path_sample.x_t, t, t, self.drop_labels(labels, self.config.class_dropout))
        target = -path_sample.dx_t  # their dx_t = x - noise is d/d(their t); ours is eps - x
        loss = (velocity.float() - target).pow(2).mean()  # L_CFM
        return LossOutput(loss, {"mse": loss.detach()})

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net=None,
               solver: Optional[str] = None, **options) -> Tensor:
        self.check_steps(steps)
        if options:
            raise JumpflowError(f"unknown sampling option(s) {', '.join(sorted(options))} for {self.name}; "
                                f"valid: solver")
        solver = solver or self.config.solver
        self.check_solver(solver)
        model = velocity_model_class(self.theirs.ModelWrapper)(net if net is not None else self.net)
        # Fixed step 1 / steps given as the grid itself: torchdiffeq's step_size=1/steps rounds to an extra tiny
        # step for some step counts (61, 109, ...), which would break the NFE count.
        grid = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)  # their time: noise (0) -> data (1)
        return self.theirs.ODESolver(velocity_model=model).sample(
            x_init=noise, step_size=None, method=solver, time_grid=grid, labels=labels)

    def nfe(self, steps: int) -> int:
        return SOLVER_NFE[self.config.solver] * steps
