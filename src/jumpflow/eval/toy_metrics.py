"""Sample-quality metrics for data whose law we know or can sample: toys, Gaussian mixtures, small images.

Two-sample distances (any data, flattened to vectors):
  * sliced Wasserstein-2 (Rabin et al. 2011; Bonneel et al. 2015): SW2(P, Q)^2 = E_theta[W2(theta#P, theta#Q)^2]
    over uniform unit directions theta, each 1-D W2 computed exactly from the empirical quantile functions;
  * energy distance (Szekely & Rizzo 2004/2013): 2 E|X-Y| - E|X-X'| - E|Y-Y'|;
  * MMD^2 (Gretton et al. 2012), unbiased U-statistic with a sum of Gaussian (RBF) kernels.
Ground-truth metrics, where the dataset offers them: mean log-likelihood under the true density, the share of
samples inside the known support, mode coverage/balance, and the point-by-point error of a one-step map against
the exact flow map.

`evaluate_samples` reports each metric next to its real-vs-real floor, so a number can be read against the noise
level of the same metric at the same sample size.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from jumpflow.data.base import Dataset
from jumpflow.errors import JumpflowError

LOG_PROB_FLOOR = -30.0  # log-densities are clamped here so samples outside a bounded support give a finite mean
_CHUNK_ELEMENTS = 1 << 22  # pairwise blocks hold at most ~4M float64 entries (32 MB)
_MEDIAN_SUBSET = 2048  # points used for the median-distance bandwidth heuristic


def _flat(x: Tensor) -> Tensor:
    # float64: pairwise sums over 20k x 20k terms and |a|^2 + |b|^2 - 2ab lose too much in float32.
    x = torch.as_tensor(x).detach()
    if x.dim() == 1:
        x = x[:, None]  # a bare vector is N one-dimensional points
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _pair(x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Both sets flattened, in float64, on x's device."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise JumpflowError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise JumpflowError("two-sample metrics need at least 2 points in each set")
    return x, y.to(x.device)


def _directions(dim: int, n: int, generator: Optional[torch.Generator]) -> Tensor:
    """n directions uniform on the unit sphere in R^dim (normalised standard normals), shape (n, dim)."""
    theta = torch.randn(n, dim, generator=generator, dtype=torch.float64)  # on the generator's (CPU) device
    return theta / theta.norm(dim=1, keepdim=True)


def _w2_squared_1d(a: Tensor, b: Tensor) -> Tensor:
    """Squared 1-D W2 for every column of a (N, P) and b (M, P): integral over u of (F_a^-1(u) - F_b^-1(u))^2."""
    a, b = a.sort(dim=0).values, b.sort(dim=0).values
    n, m = a.shape[0], b.shape[0]
    if n == m:  # equal sizes: the optimal coupling matches sorted points
        return (a - b).pow(2).mean(dim=0)
    # Both quantile functions are piecewise constant, with jumps at i/n and j/m. On integer grid n*m the jumps
    # are i*m and j*n, so their union is exact; each piece pairs one order statistic of a with one of b.
    steps = [torch.arange(k + 1, device=a.device) * step for k, step in ((n, m), (m, n))]
    cuts = torch.unique(torch.cat(steps))  # sorted, 0 .. n*m
    left, right = cuts[:-1], cuts[1:]
    weight = (right - left).to(torch.float64) / (n * m)
    ia, ib = torch.div(left, m, rounding_mode="floor"), torch.div(left, n, rounding_mode="floor")
    return (weight[:, None] * (a[ia] - b[ib]).pow(2)).sum(dim=0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 512,
                       generator: Optional[torch.Generator] = None) -> float:
    """Sliced Wasserstein-2 distance sqrt(mean_theta W2(<theta, X>, <theta, Y>)^2) between point clouds.

    x (N, ...) and y (M, ...) are flattened to vectors; N and M may differ. Directions come from `generator`
    (pass a seeded one for reproducible numbers). For a pure shift y = x + c the value is
    |c| * sqrt(mean_theta cos^2(theta, c)), which tends to |c| / sqrt(D) for many directions.
    """
    x, y = _pair(x, y)
    theta = _directions(x.shape[1], n_projections, generator).to(x.device)
    return math.sqrt(_w2_squared_1d(x @ theta.T, y @ theta.T).mean().item())


def _pair_sum(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor], same: bool) -> float:
    """sum_{i,j} fn(|a_i - b_j|^2) over row blocks (memory O(block * M)); `same` drops the i == j terms."""
    b_sq = b.pow(2).sum(dim=1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0]))
    total = 0.0
    for start in range(0, a.shape[0], rows):
        block = a[start:start + rows]
        d2 = (block.pow(2).sum(dim=1)[:, None] + b_sq[None, :] - 2.0 * block @ b.T).clamp_min_(0.0)
        values = fn(d2)
        if same:
            r = torch.arange(block.shape[0], device=a.device)
            values[r, start + r] = 0.0
        total += values.sum().item()
    return total


def energy_distance(x: Tensor, y: Tensor, unbiased: bool = True) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo), Euclidean norm on flattened samples.

    unbiased=True (default) averages the within-set terms over i != j (U-statistics), so two samples of one law
    give ~0 (and may be slightly negative). unbiased=False divides by N^2 (V-statistics); that value is the square
    of scipy.stats.energy_distance in 1-D. Computed in blocks, so N ~ 20k fits in a few tens of MB.
    """
    x, y = _pair(x, y)
    center = torch.cat([x, y]).mean(dim=0)  # distances are shift-invariant; centring keeps |a|^2 + |b|^2 - 2ab accurate
    x, y = x - center, y - center
    n, m = x.shape[0], y.shape[0]
    xy = _pair_sum(x, y, torch.sqrt, same=False) / (n * m)
    xx = _pair_sum(x, x, torch.sqrt, same=True) / (n * (n - 1) if unbiased else n * n)
    yy = _pair_sum(y, y, torch.sqrt, same=True) / (m * (m - 1) if unbiased else m * m)
    return 2.0 * xy - xx - yy


def _median_distance(points: Tensor, generator: Optional[torch.Generator] = None) -> float:
    if points.shape[0] > _MEDIAN_SUBSET:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        points = points[torch.randperm(points.shape[0], generator=generator)[:_MEDIAN_SUBSET]]
    med = torch.pdist(points).median().item()
    return med if med > 0 else 1.0  # all points equal: any scale works


def mmd(x: Tensor, y: Tensor, bandwidths: Optional[Sequence[float]] = None) -> float:
    """Unbiased squared MMD with kernel k(a, b) = sum_s exp(-|a - b|^2 / (2 s^2)) (Gretton et al. 2012, eq. 3).

    Default bandwidths s: the median pairwise distance of the pooled data (on a fixed random subset of up to 2048
    points) times (0.5, 1, 2), so the kernel sees structure at, below and above the data's typical scale. The
    unbiased estimate is ~0 (possibly slightly negative) for two samples of one law. Pass fixed bandwidths to
    compare numbers across sample sets.
    """
    x, y = _pair(x, y)
    if bandwidths is None:
        med = _median_distance(torch.cat([x, y]))
        bandwidths = (0.5 * med, med, 2.0 * med)
    gammas = [1.0 / (2.0 * float(s) ** 2) for s in bandwidths]

    def kernel(d2: Tensor) -> Tensor:
        return sum(torch.exp(-g * d2) for g in gammas)

    n, m = x.shape[0], y.shape[0]
    kxx = _pair_sum(x, x, kernel, same=True) / (n * (n - 1))
    kyy = _pair_sum(y, y, kernel, same=True) / (m * (m - 1))
    kxy = _pair_sum(x, y, kernel, same=False) / (n * m)
    return kxx + kyy - 2.0 * kxy


def mean_log_likelihood(samples: Tensor, dataset: Dataset, floor: Optional[float] = LOG_PROB_FLOOR) -> float:
    """Mean of dataset.log_prob(samples), each term clamped below at `floor` (default -30; NaN counts as floor).

    The clamp keeps the mean finite when some samples fall outside a bounded support (log p = -inf) and bounds the
    pull of far outliers; a sample outside the support then costs exactly `floor`. Pick a lower floor (or None:
    no clamp, -inf possible) for high-dimensional densities, where honest log-densities can sit below -30.
    """
    if not dataset.has_density:
        raise JumpflowError(f"{dataset.name} has no exact density")
    lp = dataset.log_prob(samples).detach().to(torch.float64)
    if floor is not None:
        lp = torch.nan_to_num(lp, nan=floor).clamp_min(floor)
    return lp.mean().item()


def _require_support(dataset: Dataset) -> None:
    if not dataset.has_support:
        raise JumpflowError(f"{dataset.name} has no known support")


def support_fraction(samples: Tensor, dataset: Dataset) -> float:
    """Share of samples inside the dataset's known support (1.0 for real data)."""
    _require_support(dataset)
    return dataset.in_support(samples).to(torch.float64).mean().item()


def _mode_shares(samples: Tensor, dataset: Dataset) -> Tensor:
    """(n_modes + 1,) shares of samples per mode; the last bin holds the samples outside every mode (-1)."""
    modes = dataset.mode_of(samples).long()
    modes = torch.where(modes < 0, torch.full_like(modes, dataset.n_modes), modes)
    return torch.bincount(modes, minlength=dataset.n_modes + 1).to(torch.float64) / modes.numel()


def mode_coverage(samples: Tensor, dataset: Dataset, min_share: Optional[float] = None) -> float:
    """Fraction of the dataset's modes that receive at least `min_share` of all samples.

    Default min_share = 0.25 / n_modes: a mode counts as covered once it holds a quarter of its fair share, so a
    balanced generator scores 1.0 and one that drops (or nearly drops) k of K modes scores (K - k) / K.
    """
    _require_support(dataset)
    if min_share is None:
        min_share = 0.25 / dataset.n_modes
    shares = _mode_shares(samples, dataset)[:-1]
    return (shares >= min_share).to(torch.float64).mean().item()


def mode_balance(samples: Tensor, dataset: Dataset, reference: Tensor) -> float:
    """Total variation distance between the mode histograms of samples and of real `reference` data.

    The histograms have one extra bin for "in no mode", so mass off the support counts too. 0: same mode
    proportions; 1: disjoint. Sliced Wasserstein can miss what this catches (e.g. a uniform box over a
    checkerboard's bounding square matches its marginals but puts half its mass between the squares).
    """
    _require_support(dataset)
    return 0.5 * (_mode_shares(samples, dataset) - _mode_shares(reference, dataset)).abs().sum().item()


def _flow_map_errors(generated: Tensor, noise: Tensor, dataset: Dataset, t: float, s: float) -> Tuple[float, float]:
    """(mean error, mean error / spread of the exact targets); one call to the (possibly costly) exact map."""
    if not dataset.has_flow_map:
        raise JumpflowError(f"{dataset.name} has no exact flow map")
    target = _flat(dataset.flow_map(noise, t, s))
    generated = _flat(generated).to(target.device)
    if generated.shape != target.shape:
        raise JumpflowError(f"generated {tuple(generated.shape)} and exact map {tuple(target.shape)} differ")
    err = (generated - target).norm(dim=1).mean().item()
    spread = (target - target.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt().item()
    return err, (err / spread if spread > 0 else float("inf"))


def flow_map_error(generated: Tensor, noise: Tensor, dataset: Dataset, t: float = 1.0, s: float = 0.0,
                   relative: bool = False) -> float:
    """Mean Euclidean distance |generated_i - Phi_{t->s}(noise_i)| to the exact flow map of each noise point.

    This is the point-by-point error of a one-step map (same noise in, compare outputs), not a distributional
    distance. relative=True divides by the spread of the exact targets, sqrt(E|x - E x|^2) (root of the total
    variance), so 1.0 is about the error of always answering the mean.
    """
    return _flow_map_errors(generated, noise, dataset, t, s)[1 if relative else 0]


def evaluate_samples(samples: Tensor, dataset: Dataset, n_reference: Optional[int] = None, seed: int = 0,
                     noise: Optional[Tensor] = None, n_projections: int = 512) -> Dict[str, Union[float, str]]:
    """Every metric that applies to `dataset`, each next to its real-vs-real floor `<name>_floor`.

    One call dataset.reference(n_reference + N, generator seeded from `seed`) is shuffled and split into
    ref (n_reference rows, default N) and ref2 (N rows). Values compare samples with ref; floors compare ref2 with
    ref the same way (same projections, same MMD bandwidths: the median heuristic on ref), so a value near its
    floor is as good as real data at this sample size. For the density and support metrics the floor is the metric
    on ref2 itself (mode_balance: ref2's histogram against ref's). Finite datasets return their test split from
    reference(); when it is too short, ref and ref2 are its two disjoint halves and `floor_note` says so. With
    `noise` (the inputs that produced `samples`) and an exact flow map, `flow_map_error` and `flow_map_error_rel`
    are added (their floor is 0 by definition).

    Returns plain floats keyed: n_samples, sliced_wasserstein, energy_distance, mmd, [log_likelihood],
    [support_fraction, mode_coverage, mode_balance], each with `_floor`, plus optional floor_note.
    """
    samples = torch.as_tensor(samples).detach().cpu()  # the datasets' ground truth lives on the CPU
    n = samples.shape[0]
    n_ref = n if n_reference is None else int(n_reference)
    reference = torch.as_tensor(dataset.reference(n_ref + n, torch.Generator().manual_seed(seed))).detach()
    # Shuffle before splitting: a test split stored in class order would otherwise give halves of different laws.
    reference = reference[torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(seed + 1))]
    out: Dict[str, Union[float, str]] = {"n_samples": float(n)}
    if reference.shape[0] >= n_ref + n:
        ref, ref2 = reference[:n_ref], reference[n_ref:n_ref + n]
    else:
        half = reference.shape[0] // 2
        if half < 2:
            raise JumpflowError(f"{dataset.name} gives {reference.shape[0]} reference samples; need at least 4")
        ref, ref2 = reference[:half], reference[half:2 * half]
        out["floor_note"] = (f"reference has only {reference.shape[0]} samples (< {n_ref + n}): values compare the "
                             f"{n} samples with one half ({half}), floors compare the two disjoint halves")

    def both(name: str, metric: Callable[[Tensor], float]) -> None:
        out[name], out[name + "_floor"] = float(metric(samples)), float(metric(ref2))

    med = _median_distance(_flat(ref))  # fixed from real data, so value and floor use the same kernel
    bandwidths = (0.5 * med, med, 2.0 * med)
    both("sliced_wasserstein",
         lambda x: sliced_wasserstein(x, ref, n_projections, torch.Generator().manual_seed(seed + 2)))
    both("energy_distance", lambda x: energy_distance(x, ref))
    both("mmd", lambda x: mmd(x, ref, bandwidths))
    if dataset.has_density:
        both("log_likelihood", lambda x: mean_log_likelihood(x, dataset))
    if dataset.has_support:
        both("support_fraction", lambda x: support_fraction(x, dataset))
        both("mode_coverage", lambda x: mode_coverage(x, dataset))
        both("mode_balance", lambda x: mode_balance(x, dataset, ref))
    if noise is not None and dataset.has_flow_map:
        noise = torch.as_tensor(noise).detach().cpu()
        out["flow_map_error"], out["flow_map_error_rel"] = _flow_map_errors(samples, noise, dataset, 1.0, 0.0)
    return out
