"""k-nearest-neighbour manifold metrics on feature sets: fidelity and diversity as two separate numbers.

Each point x of a set gets a ball B(x, r_k(x)), r_k(x) = distance to its k-th nearest neighbour in the same set
(the point itself excluded). The union of the balls estimates the set's manifold.
  * precision / recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing generative
    models", eq. 1-3): precision = share of fake points inside the real manifold, recall = share of real points
    inside the fake manifold.
  * density / coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models",
    eq. 3-4): density = (1 / kM) sum_j #{real balls holding fake_j}, coverage = share of real balls holding at
    least one fake point. Both use real balls only, so outliers among the fakes cannot inflate them.
A point on a ball's boundary counts as inside (distance <= radius), as in both papers (up to a 1e-9 relative margin
that absorbs round-off).

Distances are computed in float64 on row blocks (torch.cdist), so 10k x 10k sets never hold a full N x M matrix.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor

from jumpflow.errors import JumpflowError

_CHUNK_ELEMENTS = 1 << 22  # a distance block holds at most ~4M float64 entries (32 MB)
# cdist's matmul form gives d(a, b) and d(b, a) that can differ in the last bits, so a point lying exactly on a ball's
# boundary (the k-th neighbour itself, when fake and real share points) could flip to "outside". Radii are widened by
# this relative margin, far below any meaningful distance but above that round-off.
_BOUNDARY_RTOL = 1e-9


def _features(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() != 2:
        raise JumpflowError(f"{name} features must be 2-D (N, D), got shape {tuple(x.shape)}; "
                            "flatten images with x.reshape(len(x), -1)")
    # float64: |a|^2 + |b|^2 - 2ab inside cdist loses small distances in float32 for wide features.
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise JumpflowError(f"{name} features contain NaN or infinite values")
    return x


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise JumpflowError(f"k must be a positive integer, got {k!r}")


def _pair(real: Tensor, fake: Tensor, k: int, need_k_in_fake: bool):
    real, fake = _features(real, "real"), _features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise JumpflowError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    _check_k(k)
    sets = (("real", real), ("fake", fake)) if need_k_in_fake else (("real", real),)
    for name, x in sets:
        if k >= x.shape[0]:
            raise JumpflowError(f"k = {k} needs more than k points in the {name} set, which has {x.shape[0]}; "
                                f"use k < {x.shape[0]}")
    if fake.shape[0] < 1:
        raise JumpflowError("the fake set is empty")
    fake = fake.to(real.device)
    centre = real.mean(dim=0)  # distances are shift-invariant; centring keeps cdist's |a|^2 + |b|^2 - 2ab accurate
    return real - centre, fake - centre


def _row_blocks(a: Tensor, b: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Concatenate fn(cdist(a_block, b) (rows, M), start) over row blocks of a."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0]))
    return torch.cat([fn(torch.cdist(a[i:i + rows], b), i) for i in range(0, a.shape[0], rows)])


def knn_radii(x: Tensor, k: int) -> Tensor:
    """(N,) float64 distance from each point of x (N, D) to its k-th nearest neighbour among the other points."""
    x = _features(x, "x")
    _check_k(k)
    if k >= x.shape[0]:
        raise JumpflowError(f"k = {k} needs more than k points, got {x.shape[0]}; use k < {x.shape[0]}")
    return _knn_radii(x, k)


def _knn_radii(x: Tensor, k: int) -> Tensor:
    def kth(d: Tensor, start: int) -> Tensor:
        r = torch.arange(d.shape[0], device=d.device)
        d[r, start + r] = float("inf")  # exclude the point itself (by index, so duplicates still count)
        return d.kthvalue(k, dim=1).values
    return _row_blocks(x, x, kth)


def _ball_radii(x: Tensor, k: int) -> Tensor:
    """k-NN radii widened by _BOUNDARY_RTOL, for the "inside a ball" tests."""
    return _knn_radii(x, k) * (1.0 + _BOUNDARY_RTOL)


def _inside_any(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(P,) bool: each point lies in at least one ball B(centres_i, radii_i)."""
    return _row_blocks(points, centres, lambda d, _: (d <= radii[None, :]).any(dim=1))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> Dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake (M, D) against real (N, D) features.

    precision = share of fake points within r_k of some real point; recall = share of real points within r_k of
    some fake point (radii from each set's own k-th neighbour, the paper's default k = 3). Needs k < N and k < M.
    """
    real, fake = _pair(real, fake, k, need_k_in_fake=True)
    precision = _inside_any(fake, real, _ball_radii(real, k))
    recall = _inside_any(real, fake, _ball_radii(fake, k))
    return {"precision": precision.double().mean().item(), "recall": recall.double().mean().item()}


def density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> Dict[str, float]:
    """Density and coverage (Naeem et al. 2020) of fake (M, D) against real (N, D) features; paper's k = 5.

    density = (1 / (k M)) sum_j sum_i 1[fake_j in B(real_i, r_k(real_i))]: about 1 when fakes follow the real law,
    above 1 when they crowd dense regions (exactly (k + 1) / k for fake == real, each ball holding its centre and
    k neighbours). coverage = (1 / N) sum_i 1[some fake_j in B(real_i, r_k(real_i))]. Needs k < N.
    """
    real, fake = _pair(real, fake, k, need_k_in_fake=False)
    radii = _ball_radii(real, k)
    # Blocks over the fake rows: count the real balls around each fake point.
    counts = _row_blocks(fake, real, lambda d, _: (d <= radii[None, :]).sum(dim=1))
    # Blocks over the real rows: is the nearest fake point inside this real point's ball?
    nearest_fake = _row_blocks(real, fake, lambda d, _: d.min(dim=1).values)
    density = counts.double().sum().item() / (k * fake.shape[0])
    coverage = (nearest_fake <= radii).double().mean().item()
    return {"density": density, "coverage": coverage}
