"""Gaussian mixtures in any dimension, with exact density, velocity, score and a high-accuracy flow map.

Everything here follows METHODS.md §1 (linear path z_t = (1-t) x + t eps, t=0 data, t=1 noise):
the marginal p_t is again a mixture with components N((1-t) mu_k, S_{t,k}), S_{t,k} = (1-t)^2 Sigma_k + t^2 I,
so velocity and score are responsibility-weighted sums of the single-Gaussian closed forms (§1.1, §1.2).
The flow map has no closed form for K > 1 and is obtained by integrating the exact velocity (RK4, float64).

Each covariance is stored by its eigendecomposition Sigma_k = U_k diag(lam_k) U_k^T: S_{t,k} shares the
eigenvectors, so S_{t,k}^{-1}, log det S_{t,k} and the §1.1 matrix (tI - (1-t) Sigma_k) are diagonal in the
rotated coordinates y = U_k^T (z - m_{t,k}) for every t at once, including a different t per point.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..errors import JumpflowError
from .base import SampledDataset

TimeLike = Union[float, Tensor]

_LOG_2PI = math.log(2 * math.pi)
_GRID_OFFSET = 1e-2  # RK4 grid is uniform in log(t + offset): steps shrink ~100x from t=1 to t=0 (see flow_map)


def _float64(name: str, value, ndim: Tuple[int, ...]) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise JumpflowError(f"GaussianMixture: {name} must be numeric, got {type(value).__name__} ({e})") from None
    if out.ndim not in ndim:
        raise JumpflowError(f"GaussianMixture: {name} must have {' or '.join(map(str, ndim))} dims, "
                            f"got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise JumpflowError(f"GaussianMixture: {name} must be finite, found NaN or inf")
    return out


class GaussianMixture(SampledDataset):
    """x ~ sum_k pi_k N(mu_k, Sigma_k) in R^D (METHODS.md §1.2).

    Args:
        weights: (K,) positive mixture weights (normalised here).
        means: (K, D) component means.
        covs: (K, D, D) symmetric positive-definite covariances, or (K,) isotropic stds (Sigma_k = std_k^2 I).
        name: dataset name.
        support_radius: `in_support` accepts points within this Mahalanobis distance of some component.
            The default 3 holds 99.7% of a component's mass in D=1 and 98.9% in D=2, but fewer in higher D
            (the distance concentrates near sqrt(D)); raise it for high-dimensional mixtures.

    Computation is float64 on the input's device; results come back in the input's float dtype
    (float32 for non-float inputs).
    """

    kind = "vector"
    has_density = True
    has_flow_map = True
    has_support = True

    def __init__(self, weights, means, covs, name: str = "gmm", support_radius: float = 3.0):
        w = _float64("weights", weights, (1,))
        mu = _float64("means", means, (2,))
        c = _float64("covs ((K,) stds or (K, D, D) covariances)", covs, (1, 3))
        k, d = mu.shape
        if k == 0 or d == 0:
            raise JumpflowError(f"GaussianMixture: means must be (K, D) with K, D >= 1, got {tuple(mu.shape)}")
        if w.shape != (k,) or (w <= 0).any():
            raise JumpflowError(f"GaussianMixture: weights must be {k} positive numbers, got {w.tolist()}")
        if c.ndim == 1:  # isotropic stds
            if c.shape != (k,) or (c <= 0).any():
                raise JumpflowError(f"GaussianMixture: stds must be {k} positive numbers, got {c.tolist()}")
            lam, u = (c**2)[:, None].expand(k, d).clone(), torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
        else:
            if c.shape != (k, d, d):
                raise JumpflowError(f"GaussianMixture: covs must be ({k}, {d}, {d}) or ({k},) stds, "
                                    f"got {tuple(c.shape)}")
            if not torch.allclose(c, c.transpose(1, 2), atol=1e-8, rtol=1e-6):
                raise JumpflowError("GaussianMixture: covariances must be symmetric")
            lam, u = torch.linalg.eigh((c + c.transpose(1, 2)) / 2)
            if (lam <= 0).any():
                raise JumpflowError(f"GaussianMixture: covariances must be positive definite, smallest "
                                    f"eigenvalue found {lam.min().item():.3g}")
        self.name = name
        self.shape = (d,)
        self.n_modes = k
        self.support_radius = float(support_radius)
        self.weights = w / w.sum()
        self.means = mu
        self._lam, self._u = lam, u  # Sigma_k = U_k diag(lam_k) U_k^T

    @property
    def covs(self) -> Tensor:
        """(K, D, D) covariances (float64)."""
        return self._u @ torch.diag_embed(self._lam) @ self._u.transpose(1, 2)

    # ---------------------------------------------------------------- helpers
    def _check_points(self, z: Tensor, what: str = "z") -> Tuple[Tensor, torch.dtype]:
        if not isinstance(z, Tensor):
            z = torch.as_tensor(z)
        if z.ndim != 2 or z.shape[1] != self.shape[0]:
            raise JumpflowError(f"{self.name}: {what} must have shape (N, {self.shape[0]}), got {tuple(z.shape)}")
        dtype = z.dtype if z.is_floating_point() else torch.float32
        return z.double(), dtype

    @staticmethod
    def _check_time(t: TimeLike, n: int, device, what: str = "t") -> Tensor:
        """A float, 0-d tensor or (N,) tensor in [0, 1] -> (N,) float64."""
        tt = torch.as_tensor(t, dtype=torch.float64, device=device)
        if tt.ndim == 0:
            tt = tt.expand(n)
        elif tt.numel() == n:
            tt = tt.reshape(n)
        else:
            raise JumpflowError(f"{what} must be a float or have {n} entries (one per point), got shape "
                                f"{tuple(tt.shape)}")
        if not ((tt >= 0) & (tt <= 1)).all():  # also catches NaN
            raise JumpflowError(f"{what} must lie in [0, 1], got values in "
                                f"[{tt.min().item():.4g}, {tt.max().item():.4g}]")
        return tt

    def _parts(self, z: Tensor, t: Tensor):
        """Per-component pieces of p_t at z (float64): joint log pi_k N_k (N,K), y (N,K,D), sig2 (N,K,D)."""
        lam, u, mu = (a.to(z.device) for a in (self._lam, self._u, self.means))
        a = (1 - t)[:, None, None]  # (N,1,1)
        y = torch.einsum("kji,nkj->nki", u, z[:, None, :] - a * mu)  # U_k^T (z - (1-t) mu_k)
        sig2 = a**2 * lam + (t**2)[:, None, None]  # eigenvalues of S_{t,k}
        log_n = -0.5 * (y**2 / sig2 + sig2.log() + _LOG_2PI).sum(-1)
        return self.weights.to(z.device).log() + log_n, y, sig2

    # ---------------------------------------------------------------- sampling and density
    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if int(n) != n or n < 0:
            raise JumpflowError(f"{self.name}: number of samples must be a non-negative integer, got {n!r}")
        k = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        eps = torch.randn(int(n), self.shape[0], generator=generator, dtype=torch.float64)
        x = self.means[k] + torch.einsum("nij,nj->ni", self._u[k], self._lam[k].sqrt() * eps)
        return x.float()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density of the data (t=0), by logsumexp over components."""
        x64, dtype = self._check_points(x, "x")
        joint, _, _ = self._parts(x64, torch.zeros(x64.shape[0], dtype=torch.float64, device=x64.device))
        return torch.logsumexp(joint, -1).to(dtype)

    def responsibilities(self, z: Tensor, t: TimeLike = 0.0) -> Tensor:
        """(N, K) posterior component probabilities w_k(z, t) (METHODS.md §1.2)."""
        z64, dtype = self._check_points(z)
        joint, _, _ = self._parts(z64, self._check_time(t, z64.shape[0], z64.device))
        return torch.softmax(joint, -1).to(dtype)

    def mode_of(self, x: Tensor) -> Tensor:
        """(N,) int64 index of the most responsible component at t=0."""
        x64, _ = self._check_points(x, "x")
        joint, _, _ = self._parts(x64, torch.zeros(x64.shape[0], dtype=torch.float64, device=x64.device))
        return joint.argmax(-1)

    def in_support(self, x: Tensor) -> Tensor:
        """(N,) bool: Mahalanobis distance to some component <= support_radius."""
        x64, _ = self._check_points(x, "x")
        _, y, sig2 = self._parts(x64, torch.zeros(x64.shape[0], dtype=torch.float64, device=x64.device))
        return ((y**2 / sig2).sum(-1) <= self.support_radius**2).any(-1)

    # ---------------------------------------------------------------- exact fields
    def _velocity64(self, z: Tensor, t: Tensor) -> Tensor:
        joint, y, sig2 = self._parts(z, t)
        w = torch.softmax(joint, -1)  # responsibilities, normalised in log space
        lam, u, mu = (a.to(z.device) for a in (self._lam, self._u, self.means))
        tt = t[:, None, None]
        coef = (tt - (1 - tt) * lam) / sig2  # eigenvalues of (tI - (1-t) Sigma_k) S_{t,k}^{-1}
        v_k = -mu + torch.einsum("kij,nkj->nki", u, coef * y)  # §1.1 per component
        return (w[..., None] * v_k).sum(1)

    def velocity(self, z: Tensor, t: TimeLike) -> Tensor:
        """Exact marginal velocity E[eps - x | z_t = z] (METHODS.md §1.2); t a float or (N,) tensor."""
        z64, dtype = self._check_points(z)
        return self._velocity64(z64, self._check_time(t, z64.shape[0], z64.device)).to(dtype)

    def score(self, z: Tensor, t: TimeLike) -> Tensor:
        """Exact score grad_z log p_t(z) = -sum_k w_k S_{t,k}^{-1} (z - (1-t) mu_k) (METHODS.md §1.2)."""
        z64, dtype = self._check_points(z)
        joint, y, sig2 = self._parts(z64, self._check_time(t, z64.shape[0], z64.device))
        w = torch.softmax(joint, -1)
        s_k = -torch.einsum("kij,nkj->nki", self._u.to(z64.device), y / sig2)
        return (w[..., None] * s_k).sum(1).to(dtype)

    def denoiser(self, z: Tensor, t: TimeLike) -> Tensor:
        """x_hat = E[x | z_t = z] = z - t v(z, t) (METHODS.md §0 identities)."""
        z64, dtype = self._check_points(z)
        tt = self._check_time(t, z64.shape[0], z64.device)
        return (z64 - tt[:, None] * self._velocity64(z64, tt)).to(dtype)

    def flow_map(self, z: Tensor, t: TimeLike, s: TimeLike, n_steps: int = 1000, t_min: float = 1e-4) -> Tensor:
        """Phi_{t->s}(z) for s <= t: integrate dz/dtau = v(z, tau) from tau=t down to tau=s (METHODS.md §1.2).

        Classical RK4 in float64 with `n_steps` steps on a grid uniform in log(tau + 0.01), so steps near
        tau=0 (where narrow components make the field change fast) are ~100x shorter than near tau=1.
        RK4 stops at max(s, t_min); a final Euler step covers [s, t_min) when s < t_min, avoiding the
        stiff endpoint (its error is O(t_min^2)). s == t returns z. t and s may be floats or (N,) tensors.
        """
        z64, dtype = self._check_points(z)
        n = z64.shape[0]
        t = self._check_time(t, n, z64.device, "t")
        s = self._check_time(s, n, z64.device, "s")
        if (s > t).any():
            raise JumpflowError("flow_map goes from a later time t to an earlier time s (t=1 noise, t=0 data); "
                                "got s > t")
        if int(n_steps) != n_steps or n_steps < 1:
            raise JumpflowError(f"flow_map: n_steps must be a positive integer, got {n_steps!r}")
        if torch.equal(s, t):  # the identity, without 1000 zero-length steps
            return z64.to(dtype, copy=True)
        lo = torch.minimum(t, s.clamp(min=t_min))  # RK4 covers [lo, t]
        frac = torch.linspace(0, 1, int(n_steps) + 1, dtype=torch.float64, device=z64.device)[:, None]
        g_hi, g_lo = (t + _GRID_OFFSET).log(), (lo + _GRID_OFFSET).log()
        taus = (g_hi + frac * (g_lo - g_hi)).exp() - _GRID_OFFSET  # (n_steps+1, N), decreasing
        taus[0], taus[-1] = t, lo  # exact endpoints despite rounding
        for a, b in zip(taus[:-1], taus[1:]):
            h = (b - a)[:, None]  # negative: integrating backwards in time
            k1 = self._velocity64(z64, a)
            k2 = self._velocity64(z64 + 0.5 * h * k1, a + 0.5 * h[:, 0])
            k3 = self._velocity64(z64 + 0.5 * h * k2, a + 0.5 * h[:, 0])
            k4 = self._velocity64(z64 + h * k3, b)
            z64 = z64 + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        z64 = z64 + (s - lo)[:, None] * self._velocity64(z64, lo)  # zero step when s >= t_min
        return z64.to(dtype)
