"""A frozen teacher: the probability-flow ODE of a trained velocity field, integrated from noise (t = 1) to data.

Every distillation method reads its teacher through this class: the velocity v(z, t) and its ODE solution from
t = 1 to t = 0 on the uniform grid (Euler, or Heun's 2nd-order predictor-corrector as in Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1), whole (`sample`), as a trajectory, or
one step between two times (`ode_step`, what consistency distillation needs; Song et al. 2023, "Consistency
Models", Alg. 2). Everything is in MODEL space, the standardised space the networks train in; `scaler` maps to data.

The teacher's velocity is its backbone at s == t: net(z, t, t, labels). That is the instantaneous velocity only for
methods that train it there by flow matching (Lipman et al. 2023; the MeanFlow family's r = t share), so other
methods (consistency models, IMM, iMF's two-headed net, ...) are refused rather than silently misread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import JumpflowError
from ..paths import expand_time

if TYPE_CHECKING:  # api/build import every method and net: load them only when a checkpoint is read
    from ..build import DataInfo, Standardizer

VelocityFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]  # (z (N, *shape), t (N,), labels) -> v

# Methods whose net(z, t, t, labels) is trained by flow matching to be the instantaneous velocity at s == t.
VELOCITY_METHODS = ("flow_matching", "peer.facebook_flow_matching", "reflow", "slimflow", "meanflow",
                    "modular_meanflow", "split_meanflow", "soflow", "tvm")
SOLVER_NFE = {"euler": 1, "heun": 2}  # network evaluations per ODE step


def check_solver(solver: str) -> str:
    if solver not in SOLVER_NFE:
        raise JumpflowError(f"unknown solver {solver!r}; valid: {', '.join(SOLVER_NFE)}")
    return solver


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Teacher:
    """A frozen velocity field v(z, t, labels) in model space and the ODE solvers that integrate it.

    Build one with `from_checkpoint` (a trained run, EMA weights) or `from_velocity` (an exact field, for tests).
    Attributes: shape, num_classes, scaler (model <-> data space), info (DataInfo, checkpoints only), method,
    checkpoint, step, sha256, id (what a pair cache records to recognise this teacher), device, solver (default).
    """

    def __init__(self, velocity_fn: VelocityFn, shape: Sequence[int], num_classes: int = 0, *,
                 scaler: Optional["Standardizer"] = None, solver: str = "euler",
                 device: Union[str, torch.device] = "cpu",
                 net: Optional[nn.Module] = None, info: Optional["DataInfo"] = None, method: str = "velocity",
                 checkpoint: Optional[Path] = None, step: Optional[int] = None, sha256: Optional[str] = None,
                 teacher_id: Optional[str] = None):
        if scaler is None:
            from ..build import Standardizer

            scaler = Standardizer()  # identity: model space is data space
        self.velocity_fn = velocity_fn
        self.shape, self.num_classes = tuple(int(d) for d in shape), int(num_classes)
        self.scaler, self.solver, self.device = scaler, check_solver(solver), torch.device(device)
        self.net, self.info, self.method = net, info, method
        self.checkpoint, self.step, self.sha256, self.id = checkpoint, step, sha256, teacher_id

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path_or_run_dir: Union[str, Path], device: str = "auto",
                        solver: str = "euler") -> "Teacher":
        """The EMA weights of a checkpoint file or a run directory's latest checkpoint, frozen in eval mode."""
        from ..api import load
        from ..checkpoint import resolve_checkpoint

        check_solver(solver)
        path = resolve_checkpoint(path_or_run_dir)
        model = load(path, device=device)
        name = model.method.name
        if name not in VELOCITY_METHODS:
            raise JumpflowError(f"cannot use a {name!r} checkpoint as a teacher: its net(z, t, t) is not trained to "
                                f"be the instantaneous velocity; teachers can be {', '.join(VELOCITY_METHODS)}")
        net = model.net.eval()
        for p in model.method.parameters():  # the whole method: auxiliary nets too, never updated by a student
            p.requires_grad_(False)
        sha = file_sha256(path)
        return cls(lambda z, t, labels: net(z, t, t, labels), model.info.shape, model.info.num_classes,
                   scaler=model.scaler, solver=solver, device=model.device, net=net, info=model.info, method=name,
                   checkpoint=path.resolve(), step=model.step, sha256=sha, teacher_id=f"sha256:{sha}")

    @classmethod
    def from_velocity(cls, velocity_fn: VelocityFn, shape: Sequence[int], num_classes: int = 0,
                      solver: str = "euler", device: Union[str, torch.device] = "cpu",
                      teacher_id: Optional[str] = None) -> "Teacher":
        """Wrap an exact velocity callable (z, t, labels) -> v; `teacher_id` names it for a pair cache."""
        return cls(velocity_fn, shape, num_classes, solver=solver, device=device, teacher_id=teacher_id)

    def guided(self, guidance: float) -> "Teacher":
        """This teacher with classifier-free guidance (Ho & Salimans 2022): v = v_null + w (v_class - v_null), the
        null label being index num_classes (the label jumpflow's class dropout trains). Its id records the scale,
        so its pairs never mix with the unguided teacher's. w = 1 is the teacher itself."""
        if not self.num_classes:
            raise JumpflowError("teacher guidance needs a class-conditional teacher (trained with "
                                "class_conditional=true); this one is unconditional")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0 \
                or guidance == float("inf"):
            raise JumpflowError(f"teacher guidance must be a finite number >= 0, got {guidance!r}")
        if guidance == 1:
            return self
        conditional, null_label = self.velocity_fn, self.num_classes

        def velocity(z: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
            if labels is None:
                raise JumpflowError("a guided teacher needs labels: guidance steers toward a class")
            both = conditional(torch.cat([z, z]), torch.cat([t, t]),
                               torch.cat([labels, torch.full_like(labels, null_label)]))
            cond, uncond = both.chunk(2)
            return uncond + guidance * (cond - uncond)

        guided = Teacher.__new__(Teacher)
        guided.__dict__.update(self.__dict__)
        guided.velocity_fn = velocity
        guided.id = f"{self.id}-cfg{float(guidance):g}" if self.id else None
        return guided

    def parameters(self) -> Iterator[nn.Parameter]:
        """The frozen network's parameters (none for an exact velocity)."""
        return iter(()) if self.net is None else self.net.parameters()

    # --- the field and its ODE ------------------------------------------------------------------------------
    @torch.no_grad()
    def velocity(self, z: Tensor, t: Union[Tensor, float], labels: Optional[Tensor] = None) -> Tensor:
        """v(z, t) in model space; t a (N,) tensor (a float is broadcast)."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])
        return self.velocity_fn(z, t, labels)

    def nfe(self, steps: int, solver: Optional[str] = None) -> int:
        """Network evaluations of `sample(noise, steps)`: steps (Euler) or 2 * steps (Heun)."""
        return SOLVER_NFE[check_solver(solver or self.solver)] * steps

    @torch.no_grad()
    def ode_step(self, z: Tensor, t: Union[Tensor, float], s: Union[Tensor, float], labels: Optional[Tensor] = None,
                 solver: Optional[str] = None) -> Tensor:
        """One solver step of dz/dtau = v from time t to time s (s < t: toward the data), per-sample times (N,).

        Heun: Euler predictor z' = z + (s - t) v(z, t), trapezoidal corrector with v(z', s); at s = 0 the
        corrector is still valid (v is defined at the data end on the linear path), so no final Euler step."""
        solver = check_solver(solver or self.solver)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])
        s = torch.as_tensor(s, dtype=z.dtype, device=z.device).expand(z.shape[0])
        dt = expand_time(s - t, z)  # negative: from noise toward data
        v = self.velocity_fn(z, t, labels)
        if solver == "heun":
            v = 0.5 * (v + self.velocity_fn(z + dt * v, s, labels))
        return z + dt * v

    @torch.no_grad()
    def sample(self, noise: Tensor, steps: int, labels: Optional[Tensor] = None,
               solver: Optional[str] = None) -> Tensor:
        """Integrate from t = 1 (noise) to t = 0 in `steps` uniform steps; returns model-space samples."""
        for z in self._integrate(noise, steps, labels, solver, None):
            pass
        return z

    @torch.no_grad()
    def trajectory(self, noise: Tensor, steps: Optional[int] = None, labels: Optional[Tensor] = None,
                   solver: Optional[str] = None, times: Optional[Sequence[float]] = None) -> Tensor:
        """States (len(grid), N, *shape) at the grid times, the noise first: the uniform grid 1 -> 0 of `steps`
        steps, or `times` (strictly decreasing, any start and end in [0, 1]) instead."""
        return torch.stack(list(self._integrate(noise, steps, labels, solver, times)))

    def _integrate(self, noise: Tensor, steps: Optional[int], labels: Optional[Tensor], solver: Optional[str],
                   times: Optional[Sequence[float]]) -> Iterator[Tensor]:
        """Yield the state at each grid time (one at a time: `sample` keeps only the last)."""
        noise, labels = self._checked(noise, labels)
        grid = self._grid(steps, times, noise)
        solver = check_solver(solver or self.solver)
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        z = noise
        yield z
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            z = self.ode_step(z, ones * t_now, ones * t_next, labels, solver)
            yield z

    # --- input checks ---------------------------------------------------------------------------------------
    def _grid(self, steps: Optional[int], times: Optional[Sequence[float]], like: Tensor) -> Tensor:
        if times is None:
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise JumpflowError(f"steps must be a positive integer, got {steps!r}")
            # the same uniform grid as jumpflow.paths.time_grid, in the noise's dtype (float64 tests stay float64)
            return torch.linspace(1.0, 0.0, steps + 1, device=like.device, dtype=like.dtype)
        grid = torch.as_tensor(times, dtype=like.dtype, device=like.device).flatten()
        if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()) or grid.min() < 0 or grid.max() > 1:
            raise JumpflowError(f"times must be at least two strictly decreasing values in [0, 1], got {times!r}")
        return grid

    def _checked(self, noise: Tensor, labels: Optional[Tensor]):
        if tuple(noise.shape[1:]) != self.shape:
            expected = ", ".join(map(str, self.shape))
            raise JumpflowError(f"noise has shape {tuple(noise.shape)}, expected (N, {expected})")
        noise = noise.to(self.device)
        if labels is None:
            return noise, None
        if not self.num_classes:
            raise JumpflowError("this teacher is unconditional; it takes no labels")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if labels.shape != (noise.shape[0],):
            raise JumpflowError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
        # num_classes itself is the null label of classifier-free guidance: an unconditional sample
        if labels.min() < 0 or labels.max() > self.num_classes:
            raise JumpflowError(f"labels must be in [0, {self.num_classes}] ({self.num_classes}: the null label)")
        return noise, labels
