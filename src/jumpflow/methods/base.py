"""The contract between a method and the generic Trainer.

A method is an nn.Module that owns its student network (`self.net`) and any auxiliary networks. The Trainer calls
`loss(x, labels)` each step (methods with several optimizers: `update_loss` for each of `updates(step)`) and `sample(noise, steps, ...)` for pictures and evaluation, always passing the EMA copy
of the student as `net=`; it never branches on a method's name. Randomness (times, noise, label dropout) comes from
torch's global RNG, whose state the Trainer saves in every checkpoint so resume is exact.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import JumpflowError


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate
    metrics: Dict[str, Tensor] = field(default_factory=dict)  # detached scalars, read only at log steps (no sync)


class Method(nn.Module):
    name: ClassVar[str] = ""
    kind: ClassVar[str] = "from_scratch"  # or "distillation"
    paper: ClassVar[str] = ""
    Config: ClassVar[type]  # a dataclass of the method's options, defaults = the paper's values
    default_sample_steps: ClassVar[int] = 1
    bench_steps: ClassVar[Tuple[int, ...]] = (1, 2)  # sampling step counts the benchmark measures
    max_sample_steps: ClassVar[Optional[int]] = None  # a method trained for fewer jumps only (InstaFlow: 1)
    requires: ClassVar[str] = ""  # a pip package the method needs beyond jumpflow's core (peers)

    def __init__(self, net: nn.Module, config: Any, shape: tuple, num_classes: int = 0):
        super().__init__()
        self.net = net
        self.config = config
        self.shape = tuple(shape)
        self.num_classes = num_classes

    @classmethod
    def backbone_requirements(cls, config: Any) -> Dict[str, Any]:
        """Backbone options this method needs, given its config (e.g. iMF: {"extra_inputs": 3, "heads": 2}).
        build_method merges them into the backbone options and refuses a user value that contradicts one."""
        return {}

    # --- training -----------------------------------------------------------------------------------------
    def loss(self, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        raise NotImplementedError

    def self_check(self, x: Tensor, labels: Optional[Tensor]) -> Dict[str, float]:
        """Run once by the Trainer before the first step; a method whose loss relies on something that can silently
        be wrong on a given model (a JVP rule) checks it here and returns {"ok": 0.0 or 1.0, ...}."""
        return {}

    def use_ema(self, ema_net: nn.Module) -> None:
        """The Trainer hands over its EMA copy of the student, for methods whose targets come from it (shortcut
        models' bootstrap, consistency training's teacher). Kept outside the module tree: it is saved once, as EMA."""
        self.__dict__["_ema_net"] = ema_net

    def begin_step(self, step: int, micro_batch: int = 0) -> None:
        """The Trainer calls this before each loss it computes, with the number of optimizer steps done and the
        count of losses already computed in this step (over micro-batches and, for methods with several optimizers,
        over updates). A method's `training_step` counter (curricula; its loss advances it, so hand-written loops need
        no Trainer) is set to `step`, so every micro-batch of one step sees the same curriculum position whatever
        grad_accum is. Once-a-step work (an EMA target's update) belongs at micro_batch 0."""
        counter = getattr(self, "training_step", None)
        if isinstance(counter, Tensor):
            counter.fill_(step)

    def mirrors(self) -> List[nn.Module]:
        """Copies of the student's network that follow its weights (an EMA target net): under parallel=fsdp the
        Trainer shards them exactly like the student, so they can keep following it shard by shard."""
        return []

    def plan(self, total_steps: int) -> None:
        """The Trainer says how many optimizer steps the run is set to last (again on resume, with the resumed
        run's value). Curricula that their papers tie to the length of training (iCT's discretisation, ECT's
        stages) follow it unless their config fixes a length; the default method has nothing to plan."""
        self.__dict__["_planned_steps"] = int(total_steps)

    @property
    def planned_steps(self) -> Optional[int]:
        """The run length from `plan`, or None outside a Trainer."""
        return self.__dict__.get("_planned_steps")

    @property
    def ema_net(self) -> nn.Module:
        """The EMA student when training under the Trainer, else the student itself."""
        return self.__dict__.get("_ema_net") or self.net

    def trainable_parameters(self) -> List[nn.Parameter]:
        """What the student's optimizer ("net") updates."""
        return list(self.net.parameters())

    # --- several networks, several optimizers (DMD2, SiD, SIM): the Trainer's hooks ----------------------------
    def optimizers(self) -> Dict[str, Tuple[List[nn.Parameter], float]]:
        """Each optimizer the Trainer builds: name -> (parameters, learning-rate multiplier). The student's is "net";
        a method with auxiliary networks (a fake-score net) adds its own."""
        return {"net": (self.trainable_parameters(), 1.0)}

    def updates(self, step: int) -> Sequence[str]:
        """The optimizer updates of training step `step`, in order; each is one `update_loss`, backward and
        optimizer step (two-time-scale rules repeat a name). The EMA follows the student once per step."""
        return ("net",)

    def update_loss(self, name: str, x: Tensor, labels: Optional[Tensor]) -> LossOutput:
        """The loss that optimizer `name` descends; the default (one optimizer) is `loss`."""
        return self.loss(x, labels)

    # --- distillation ---------------------------------------------------------------------------------------
    needs_teacher: ClassVar[bool] = False  # True: the Trainer loads TrainConfig.teacher and calls attach_teacher
    bench_teacher: ClassVar[str] = "flow_matching"  # the benchmark cell a distillation method distils
    show_progress: bool = True  # progress bars for work done in attach_teacher (the Trainer sets its own flag)

    def attach_teacher(self, teacher: Any, workspace: Path) -> None:
        """The Trainer hands a frozen `jumpflow.distill.Teacher` (model space = the student's) before the first step
        and again on resume, before the checkpoint is restored. `workspace` is a folder for what the method builds
        from the teacher once (a pair cache); methods that build something extend this. Kept outside the module tree:
        the teacher is never saved with the student."""
        self.__dict__["_teacher"] = teacher

    @property
    def teacher(self) -> Any:
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise JumpflowError(f"{self.name} trains from a teacher: train it with `jumpflow distill --teacher RUN` "
                                f"(TrainConfig.teacher), not from data alone")
        return teacher

    # --- sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None, net: Optional[nn.Module] = None,
               **options) -> Tensor:
        """Map noise at t = 1 to data at t = 0 in `steps` network jumps (NFE counted by `nfe`).

        The default is `flow_map_jumps`, right for every method whose net(z, t, s) is the average velocity from t
        down to s (MeanFlow and its kin); methods with another sampler or with sampling options override it."""
        self.check_steps(steps)
        if options:
            raise JumpflowError(f"{self.name} sampling takes no option(s) {', '.join(sorted(options))}")
        return self.flow_map_jumps(noise, steps, net if net is not None else self.net, labels)

    def nfe(self, steps: int) -> int:
        return steps

    def flow_map_jumps(self, noise: Tensor, steps: int, net: nn.Module, labels: Optional[Tensor] = None,
                       scale=1.0) -> Tensor:
        """The k-step sampler of every flow-map method whose net is an average velocity from t down to s:
        z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) * scale * net(z_{t_i}, t_i, t_{i+1}) on the uniform grid 1 -> 0."""
        from ..paths import time_grid

        grid = time_grid(steps, device=noise.device)
        z = noise
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            z = z - (t_now - t_next) * scale * net(z, ones * t_now, ones * t_next, labels).to(z.dtype)
        return z

    # --- shared helpers -------------------------------------------------------------------------------------
    def drop_labels(self, labels: Optional[Tensor], probability: float) -> Optional[Tensor]:
        """Classifier-free guidance training: replace a share of labels by the null label (index num_classes)."""
        if labels is None or probability <= 0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < probability
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    @staticmethod
    def check_steps(steps: int) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise JumpflowError(f"steps must be a positive integer, got {steps!r}")


def make_config(config_cls: type, options: Dict[str, Any]) -> Any:
    """Build a method config from user options, refusing unknown names (a typo must not be silently ignored)."""
    valid = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise JumpflowError(f"unknown option(s) {', '.join(unknown)} for {config_cls.__qualname__}; "
                            f"valid: {', '.join(valid)}")
    return config_cls(**options)


class EMATargetNet:
    """Mixin for a method whose targets come from an EMA copy of its student, `target_net` (None when
    `config.target_ema` is 0: the student itself, under stop-gradient). The copy lives inside the method, so
    checkpoints carry it and resume is exact; it moves toward the student once per training step, before that step's
    loss (after the previous optimizer update), and is sharded with the student under parallel=fsdp."""

    def make_target_net(self, net: nn.Module) -> None:
        self.target_net = copy.deepcopy(net).requires_grad_(False) if self.config.target_ema > 0 else None

    @torch.no_grad()
    def update_target(self) -> None:
        """target <- target_ema * target + (1 - target_ema) * student; buffers are copied."""
        if self.target_net is None:
            return
        decay = self.config.target_ema
        for target, online in zip(self.target_net.parameters(), self.net.parameters()):
            target.lerp_(online.detach(), 1.0 - decay)
        for target, online in zip(self.target_net.buffers(), self.net.buffers()):
            target.copy_(online)

    def begin_step(self, step: int, micro_batch: int = 0) -> None:
        super().begin_step(step, micro_batch)
        if micro_batch == 0 and self.training:
            self.update_target()

    def mirrors(self) -> List[nn.Module]:
        return [self.target_net] if self.target_net is not None else []
