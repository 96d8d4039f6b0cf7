"""Interpolation paths between data (t = 0) and noise (t = 1), and the time samplers methods draw from.

Only the linear (rectified) path lives here for now: z_t = (1 - t) x + t eps, velocity v = eps - x
(METHODS.md §0). Other paths (TrigFlow, VP/EDM) will sit beside it and convert to it by SNR matching.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample time broadcasts against a (B, *shape) tensor."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x + t eps for per-sample times t of shape (B,)."""
    t = expand_time(t, x)
    return (1 - t) * x + t * noise


def conditional_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """d z_t / dt along the straight line from x to eps: v = eps - x."""
    return noise - x


def uniform_times(n: int, device=None) -> Tensor:
    return torch.rand(n, device=device)


def logit_normal_times(n: int, mean: float, std: float, device=None) -> Tensor:
    """LN(mean, std): t = sigmoid(mean + std * n), n ~ N(0, 1) (SD3; MeanFlow's default time sampler)."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


def sample_times(n: int, sampler: str, mean: float = 0.0, std: float = 1.0, device=None) -> Tensor:
    if sampler == "uniform":
        return uniform_times(n, device)
    if sampler == "logit_normal":
        return logit_normal_times(n, mean, std, device)
    raise ValueError(f"unknown time sampler {sampler!r}; valid: uniform, logit_normal")


def time_grid(steps: int, device=None) -> Tensor:
    """Uniform grid 1 = t_0 > t_1 > ... > t_steps = 0 used by every few-step sampler."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device)
