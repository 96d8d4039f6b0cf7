"""What every student trained on the teacher's (noise, sample) pairs shares: the cache, the batches, the start.

Reflow (Liu et al. 2023, "Flow Straight and Fast"), InstaFlow's distillation (Liu et al. 2024, "InstaFlow: One Step
is Enough for High-Quality Diffusion-Based Text-to-Image Generation") and Re-MeanFlow (Zhang et al. 2025, "Flow
Straighter and Faster") all train on pairs z_0 = ODE_{1 -> 0}(z_1) of a frozen teacher. The pairs are generated once
into a cache (`jumpflow.distill.pairs`) keyed by the teacher's checkpoint hash and the ODE settings, so every student
of the same teacher reuses them; batches are drawn from them with torch's global RNG (exact resume). The student
starts from the teacher's weights when their backbones match (rectified flow's k-th reflow starts from the (k-1)-th
flow), else from its own initialisation (a smaller student).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cache import cache_dir
from ..errors import JumpflowError
from ..methods.base import Method
from .pairs import generate_pairs
from .teacher import check_solver


@dataclass
class PairConfig:
    pairs: int = 50_000  # teacher ODE pairs (the cache grows if a later student asks for more)
    teacher_steps: int = 100  # ODE steps per pair: the teacher at the benchmark's 100 steps
    teacher_solver: str = "euler"  # "euler" or "heun" (2 NFE per step)
    pair_seed: int = 0  # seed of the pairs' noise (and labels): part of the cache's identity
    pair_cache: str = ""  # a folder for the cache; "" = jumpflow's cache folder, keyed by teacher and settings
    init_from_teacher: bool = True  # start the student from the teacher's weights when the backbones match
    # Classifier-free guidance scale of a class-conditional teacher's pairs (InstaFlow's teacher samples with
    # guidance); None = the teacher as trained. Part of the cache's identity.
    teacher_guidance: Optional[float] = None

    def check_pairs(self) -> None:
        for name in ("pairs", "teacher_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise JumpflowError(f"{name} must be a positive integer, got {value!r}")
        check_solver(self.teacher_solver)
        w = self.teacher_guidance
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf")):
            raise JumpflowError(f"teacher_guidance must be None or a finite number >= 0, got {w!r}")


class PairDistillation(Method):
    """A method that trains on a cached set of teacher pairs; subclasses write `loss` with `pair_batch`."""

    kind = "distillation"
    needs_teacher = True

    def attach_teacher(self, teacher, workspace: Path) -> None:
        cfg = self.config
        if cfg.teacher_guidance is not None:
            teacher = teacher.guided(cfg.teacher_guidance)
        super().attach_teacher(teacher, workspace)
        folder = Path(cfg.pair_cache) if cfg.pair_cache else self.default_cache(teacher, cfg)
        started = time.perf_counter()
        cache = generate_pairs(teacher, folder, cfg.pairs, cfg.teacher_steps, solver=cfg.teacher_solver,
                               seed=cfg.pair_seed, progress=self.show_progress)
        pairs = cache.load_all(device=teacher.device)
        # The first `pairs` rows: a cache grown by another student holds more, and those must not change this one.
        self.__dict__["_pairs"] = tuple(None if p is None else p[: cfg.pairs] for p in pairs)
        self.__dict__["pair_cache_dir"] = folder
        self.__dict__["pair_seconds"] = time.perf_counter() - started  # 0 when the cache was there already
        if cfg.init_from_teacher:
            self.start_from(teacher)

    @staticmethod
    def default_cache(teacher, cfg: PairConfig) -> Path:
        """One folder per teacher and ODE setting (a cache refuses other settings), shared by all its students."""
        if not teacher.id:
            raise JumpflowError("this teacher has no id: give the pair cache a folder (pair_cache=...)")
        guidance = f"-cfg{cfg.teacher_guidance:g}" if cfg.teacher_guidance not in (None, 1) else ""
        name = (f"{teacher.id.replace('sha256:', '')[:16]}{guidance}-{cfg.teacher_solver}{cfg.teacher_steps}"
                f"-seed{cfg.pair_seed}")
        return cache_dir("pairs", name)

    def start_from(self, teacher) -> None:
        """Copy the teacher's weights into the student where every name and shape match (else keep its own)."""
        if teacher.net is None:
            return
        source, target = teacher.net.state_dict(), self.net.state_dict()
        if source.keys() == target.keys() and all(source[k].shape == target[k].shape for k in source):
            self.net.load_state_dict(source)

    def pair_batch(self, batch_size: int, device) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(noise (B, *shape), teacher sample (B, *shape), labels (B,) or None), drawn uniformly with replacement."""
        pairs = self.__dict__.get("_pairs")
        if pairs is None:
            self.teacher  # raises the "needs a teacher" error
        noise, sample, labels = pairs
        index = torch.randint(noise.shape[0], (batch_size,), device=noise.device)
        pick = lambda a: None if a is None else a[index].to(device)  # noqa: E731
        return pick(noise), pick(sample), pick(labels)
