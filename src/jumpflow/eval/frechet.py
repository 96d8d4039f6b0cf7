"""Frechet distance between Gaussians fitted to feature sets (FID when the features come from Inception-v3).

FD^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Dowson & Landau 1982; Heusel et al. 2017, eq. 6).
S1 S2 is not symmetric, so instead of a general matrix square root (scipy.linalg.sqrtm, which can return complex
noise) we use that S1 S2 is similar to the symmetric PSD matrix A = S1^{1/2} S2 S1^{1/2}: both have the same
eigenvalues, so Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(A)). Two symmetric eigendecompositions in float64, no scipy.

Statistics are stored as `.npz` files with arrays `mu` (D,) and `sigma` (D, D), the layout FID tools share.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Tuple, Union

import numpy as np
import torch

from jumpflow.errors import JumpflowError

ArrayLike = Union[np.ndarray, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise JumpflowError(f"{name} contains NaN or infinite values; statistics need finite numbers")
    return x


def feature_statistics(features: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), both float64 (same as np.cov(rowvar=False))."""
    x = _as_float64(features, "features")
    if x.ndim != 2:
        raise JumpflowError(f"features must be 2-D (N, D), got shape {x.shape}; flatten with x.reshape(len(x), -1)")
    if x.shape[0] < 2:
        raise JumpflowError(f"a covariance needs at least 2 feature vectors, got {x.shape[0]}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _check_statistics(mu: ArrayLike, sigma: ArrayLike, name: str) -> Tuple[np.ndarray, np.ndarray]:
    mu, sigma = _as_float64(mu, f"{name} mean"), _as_float64(sigma, f"{name} covariance")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise JumpflowError(f"{name} statistics must be a mean (D,) and a covariance (D, D), "
                            f"got {mu.shape} and {sigma.shape}")
    return mu, sigma


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; round-off can make tiny eigenvalues negative, so clip them to 0."""
    lam, vec = np.linalg.eigh((s + s.T) / 2)
    return (vec * np.sqrt(np.clip(lam, 0.0, None))) @ vec.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), as FID reports it.

    |mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr (S1 S2)^{1/2} (Dowson & Landau 1982; Heusel et al. 2017). The trace of the
    square root is sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), exact for PSD S1, S2 and stable when they are
    singular (fewer samples than dimensions). Clipped at 0 against round-off.
    """
    mu1, sigma1 = _check_statistics(mu1, sigma1, "first")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise JumpflowError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1  # symmetric PSD, same eigenvalues as S1 S2
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(lam, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def frechet_distance_from_features(a: ArrayLike, b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def save_statistics(path: PathLike, mu: ArrayLike, sigma: ArrayLike) -> None:
    """Write `mu` and `sigma` to an `.npz` file at exactly `path` (temp file then rename, so no half-written file)."""
    mu, sigma = _check_statistics(mu, sigma, "saved")
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # a file object stops np.savez from appending ".npz" to the name
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


def load_statistics(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """Read (mu, sigma) from an `.npz` file written by save_statistics (or any file with arrays `mu`, `sigma`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise JumpflowError(f"statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)  # no pickles: a statistics file must not run code
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise JumpflowError(f"{path}: not a readable .npz statistics file ({err})") from err
    if not hasattr(data, "files"):  # a bare .npy array, not an archive of named arrays
        raise JumpflowError(f"{path}: expected an .npz archive with arrays 'mu' and 'sigma', found a single array")
    with data:
        missing = [key for key in ("mu", "sigma") if key not in data.files]
        if missing:
            raise JumpflowError(f"{path}: missing array(s) {missing}; a statistics file holds 'mu' (D,) and "
                                f"'sigma' (D, D), found {sorted(data.files)}")
        try:
            mu, sigma = data["mu"], data["sigma"]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as err:
            raise JumpflowError(f"{path}: corrupt .npz statistics file ({err})") from err
    return _check_statistics(mu, sigma, path)
