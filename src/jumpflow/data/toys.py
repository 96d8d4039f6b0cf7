"""2-D toy distributions (plus a 1-D mixture), all roughly unit scale and inside about [-2.5, 2.5]^D.

Scales (exact):
  checkerboard  uniform on the 8 black squares (side 1) of a 4x4 board covering [-2, 2]^2; density 1/8 there.
  8gaussians    8 equal-weight isotropic Gaussians, means on a circle of radius 2 (angles k*pi/4), std 0.15.
  moons         two interleaved unit half-circles (as in scikit-learn's make_moons), Gaussian noise 0.05,
                then each coordinate standardised to mean 0 / std 1 with the exact moments (range ~[-1.8, 1.8]).
  spirals       two arms r = 2 * theta / (3 pi), theta in [0, 3 pi] (1.5 turns), second arm = -first,
                isotropic Gaussian noise 0.05; theta = 3 pi sqrt(U) so points are ~uniform along the arc.
  rings         n_rings (default 4) equal-weight circles with radii 2k/n_rings (0.5, 1, 1.5, 2), radial
                Gaussian noise 0.05; support = within 3 noise std of a ring's radius.
  gmm1d         1-D: 0.5 N(-2, 0.3^2) + 0.5 N(2, 0.3^2) (METHODS.md §1.2 fixture (a)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from .base import SampledDataset
from .gaussian_mixture import GaussianMixture


def _count(n) -> int:
    if int(n) != n or n < 0:
        raise JumpflowError(f"number of samples must be a non-negative integer, got {n!r}")
    return int(n)


def _points(x, d: int, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != d:
        raise JumpflowError(f"{name}: x must have shape (N, {d}), got {tuple(x.shape)}")
    return x.float()


def _noise(noise: float, name: str) -> float:
    if not (isinstance(noise, (int, float)) and 0 <= noise < 1):
        raise JumpflowError(f"{name}: noise must be a number in [0, 1), got {noise!r}")
    return float(noise)


class Checkerboard(SampledDataset):
    """Uniform on the black squares of a 4x4 board on [-2, 2]^2.

    Square (row i, column j) covers [-2+j, -1+j] x [-2+i, -1+i]; it is black when i + j is even, which gives
    8 black squares of area 1, so the exact density is 1/8 inside (log_prob = log(1/8)) and 0 outside
    (log_prob = -inf). `mode_of` numbers the black squares 0..7 in row-major order (-1 outside).
    Square edges count as inside.
    """

    name, kind, shape = "checkerboard", "vector", (2,)
    has_density = has_support = True
    n_modes = 8

    def __init__(self):
        ij = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        self._corners = torch.tensor([[-2.0 + j, -2.0 + i] for i, j in ij])  # lower-left corner (x, y)

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        n = _count(n)
        sq = torch.randint(0, 8, (n,), generator=generator)
        return self._corners[sq] + torch.rand(n, 2, generator=generator)

    def mode_of(self, x: Tensor) -> Tensor:
        x = _points(x, 2, self.name)
        cell = torch.floor(x + 2).clamp(0, 3)  # edges at +2 belong to the last cell
        j, i = cell[:, 0].long(), cell[:, 1].long()
        inside = ((x >= -2) & (x <= 2)).all(1) & ((i + j) % 2 == 0)
        idx = (i * 4 + j) // 2  # black squares alternate, so the row-major rank among them is (4i + j) // 2
        return torch.where(inside, idx, torch.full_like(idx, -1))

    def in_support(self, x: Tensor) -> Tensor:
        return self.mode_of(x) >= 0

    def log_prob(self, x: Tensor) -> Tensor:
        inside = self.in_support(x)
        return torch.where(inside, torch.tensor(math.log(1 / 8)), torch.tensor(-math.inf))


class Moons(SampledDataset):
    """Two interleaved half-circles with Gaussian noise, standardised per coordinate (exact moments)."""

    name, kind, shape = "moons", "vector", (2,)

    def __init__(self, noise: float = 0.05):
        self.noise = _noise(noise, self.name)
        # Exact moments of the noiseless mixture with theta ~ U[0, pi]: x has mean 1/2, variance 3/4;
        # y has mean 1/4, variance 5/8 - 1/pi - 1/16. Noise adds noise^2 to both variances.
        self._mean = torch.tensor([0.5, 0.25])
        self._std = torch.tensor([0.75, 0.5625 - 1 / math.pi]).add(self.noise**2).sqrt()

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        n = _count(n)
        theta = math.pi * torch.rand(n, generator=generator)
        upper = torch.rand(n, generator=generator) < 0.5
        x = torch.where(upper, theta.cos(), 1 - theta.cos())
        y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
        pts = torch.stack([x, y], 1) + self.noise * torch.randn(n, 2, generator=generator)
        return (pts - self._mean) / self._std


class Spirals(SampledDataset):
    """Two interleaved spiral arms (1.5 turns each, radius up to 2) with Gaussian noise."""

    name, kind, shape = "spirals", "vector", (2,)

    def __init__(self, noise: float = 0.05):
        self.noise = _noise(noise, self.name)

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        n = _count(n)
        theta = 3 * math.pi * torch.rand(n, generator=generator).sqrt()  # arc length ~ theta^2: sqrt evens it out
        r = 2 * theta / (3 * math.pi)
        arm = torch.where(torch.rand(n, generator=generator) < 0.5, 1.0, -1.0)
        pts = arm[:, None] * torch.stack([r * theta.cos(), r * theta.sin()], 1)
        return pts + self.noise * torch.randn(n, 2, generator=generator)


class Rings(SampledDataset):
    """Concentric circles of radii 2k/n_rings (k = 1..n_rings), equal weight each, radial Gaussian noise.

    `mode_of` = index of the nearest ring radius; `in_support` = within 3 noise std of some ring's radius.
    """

    name, kind, shape = "rings", "vector", (2,)
    has_support = True

    def __init__(self, n_rings: int = 4, noise: float = 0.05):
        if int(n_rings) != n_rings or n_rings < 1:
            raise JumpflowError(f"rings: n_rings must be a positive integer, got {n_rings!r}")
        self.noise = _noise(noise, self.name)
        self.n_modes = int(n_rings)
        self.radii = 2.0 * torch.arange(1, self.n_modes + 1) / self.n_modes

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        n = _count(n)
        ring = torch.randint(0, self.n_modes, (n,), generator=generator)
        r = self.radii[ring] + self.noise * torch.randn(n, generator=generator)
        phi = 2 * math.pi * torch.rand(n, generator=generator)
        return torch.stack([r * phi.cos(), r * phi.sin()], 1)

    def _ring_distance(self, x: Tensor):
        d = (_points(x, 2, self.name).norm(dim=1)[:, None] - self.radii).abs()
        return d.min(1)

    def mode_of(self, x: Tensor) -> Tensor:
        return self._ring_distance(x).indices

    def in_support(self, x: Tensor) -> Tensor:
        return self._ring_distance(x).values <= 3 * max(self.noise, 1e-6)


def eight_gaussians(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """8 equal-weight isotropic Gaussians with means radius * (cos k pi/4, sin k pi/4), k = 0..7."""
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), float(std)), name="8gaussians")


def gmm1d(separation: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """1-D two-mode mixture 0.5 N(-separation, std^2) + 0.5 N(separation, std^2) (METHODS.md §1.2 (a))."""
    return GaussianMixture(torch.ones(2), [[-float(separation)], [float(separation)]], torch.full((2,), float(std)),
                           name="gmm1d")


def random_gmm(dim: int = 2, n_components: int = 8, std: float = 0.2, seed: int = 0) -> GaussianMixture:
    """Equal-weight isotropic mixture in R^dim with well-separated random means.

    Means are drawn uniformly in [-2, 2]^dim from torch.Generator seeded with `seed`, one at a time, and a
    draw is rejected if it lies closer than 6 * std to an accepted mean (up to 10000 draws). Fixed seed ->
    fixed mixture. Every coordinate then has std about 1.2 (uniform spread 4/sqrt(12) plus `std`).
    """
    for opt, val in (("dim", dim), ("n_components", n_components), ("seed", seed)):
        if int(val) != val or val < (0 if opt == "seed" else 1):
            raise JumpflowError(f"gmm: {opt} must be a {'non-negative' if opt == 'seed' else 'positive'} integer, "
                                f"got {val!r}")
    if not (isinstance(std, (int, float)) and std > 0):
        raise JumpflowError(f"gmm: std must be a positive number, got {std!r}")
    gen = torch.Generator().manual_seed(int(seed))
    means = []
    for _ in range(10000):
        m = 4 * torch.rand(int(dim), generator=gen, dtype=torch.float64) - 2
        if all((m - a).norm() >= 6 * std for a in means):
            means.append(m)
            if len(means) == n_components:
                return GaussianMixture(torch.ones(int(n_components)), torch.stack(means),
                                       torch.full((int(n_components),), float(std)), name="gmm")
    raise JumpflowError(f"gmm: could not place {n_components} means in [-2, 2]^{dim} at least 6*std = {6 * std:.3g} "
                        f"apart; use fewer components, a smaller std or a larger dim")
