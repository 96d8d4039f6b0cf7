"""Your own data as a NumPy file: vectors (N, D) or images (N, C, H, W).

Accepted:
  * `.npy`: one array. `.npz`: the array under key `x`, else `arr_0`, else the only array in the file;
    optional integer labels (N,) under `y` or `labels` (num_classes = max label + 1).
  * Vectors (N, D): any finite float or integer values, used as given.
  * Images (N, C, H, W): float values already in [-1, 1] (1e-3 tolerance, then clipped), or uint8 in
    [0, 255] mapped to [-1, 1]. Channels-last (N, H, W, C) is transposed to channels-first when the last
    dim is 1, 3 or 4 and the second dim is not (so (N, 32, 32, 3) becomes (N, 3, 32, 32)).
  * Latents (`latents=True`): 4-dim float arrays (N, C, H, W), e.g. ImageNet encoded by a VAE, used as they are
    times `scale` (the VAE's scaling factor when the file holds raw latents, e.g. 0.18215 for Stable Diffusion's),
    with no range check and no channels-last guess; the image backbones (UNet, DiT) take them like images.
Files are read with allow_pickle=False. The split is deterministic: a fixed permutation (seed) holds out
`test_fraction` of the samples (rounded, at least 1) as the test set.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import JumpflowError
from .base import TensorDataset

_TOLERANCE = 1e-3  # float images may overshoot [-1, 1] by this much (rounding in the user's own scaling)


def split_indices(n: int, test_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """(train, test) index tensors: a permutation from `seed`, the first round(f * n) (>= 1) held out."""
    if n < 2:
        raise JumpflowError(f"need at least 2 samples to make a train/test split, found {n}")
    if not (isinstance(test_fraction, (int, float)) and 0 <= test_fraction < 1):
        raise JumpflowError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_test:], perm[:n_test]


def _read(path: Path) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if head != b"\x93NUMPY" and not head.startswith(b"PK"):  # .npy magic / zip (npz) magic
            # without this check NumPy tries the file as a pickle and reports "pickled data", which misleads
            raise JumpflowError(f"could not read {path}: it is not a NumPy .npy/.npz file (no .npy or zip header)")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("x", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise JumpflowError(f"{path}: cannot tell which array holds the data; expected a key 'x' or "
                                    f"'arr_0' or a single array, found keys {keys}")
            label_key = next((k for k in ("y", "labels") if k in keys and k != key), None)
            return loaded[key], (loaded[label_key] if label_key else None)
    except JumpflowError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        # object arrays (pickles) land here too: allow_pickle=False refuses them with a ValueError
        raise JumpflowError(f"could not read {path} as a NumPy .npy/.npz file of numbers: {e}") from None


def _latents(x: np.ndarray, path: Path, scale: float) -> Tensor:
    if x.dtype.kind != "f" or x.ndim != 4:
        raise JumpflowError(f"{path}: latents=true expects a float array (N, C, H, W), found dtype {x.dtype} "
                            f"shape {x.shape}")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise JumpflowError(f"scale must be a positive number, got {scale!r}")
    if not np.isfinite(x).all():
        raise JumpflowError(f"{path}: found {int((~np.isfinite(x)).sum())} NaN or inf values; data must be finite")
    return torch.from_numpy(x.astype(np.float32) * np.float32(scale))


def _to_tensor(x: np.ndarray, path: Path) -> Tensor:
    if x.dtype.kind not in "fiu":
        raise JumpflowError(f"{path}: expected a float or integer array, found dtype {x.dtype} "
                            f"(strings, booleans, complex and objects are not data)")
    if x.ndim not in (2, 4):
        hint = "; add a channel axis for (N, H, W) images: x[:, None]" if x.ndim == 3 else ""
        raise JumpflowError(f"{path}: expected 2 dims (N, D) vectors or 4 dims (N, C, H, W) images, found "
                            f"{x.ndim} dims with shape {x.shape}{hint}")
    if x.shape[0] < 2:
        raise JumpflowError(f"{path}: need at least 2 samples (train and test), found {x.shape[0]}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise JumpflowError(f"{path}: found {int((~np.isfinite(x)).sum())} NaN or inf values; data must be finite")
    if x.ndim == 2:
        return torch.from_numpy(x.astype(np.float32))
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # channels-last -> channels-first
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0)
    if x.dtype.kind in "iu":
        raise JumpflowError(f"{path}: integer images must be uint8 in [0, 255], found dtype {x.dtype}; "
                            f"convert to uint8, or to float in [-1, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - _TOLERANCE or hi > 1 + _TOLERANCE:
        raise JumpflowError(f"{path}: float images must lie in [-1, 1], found values in [{lo:.4g}, {hi:.4g}]"
                            + (" (images in [0, 1]: save 2 * x - 1; pixel values in [0, 255]: save as uint8)"
                               if lo >= 0 else ""))
    return torch.from_numpy(np.clip(x, -1, 1).astype(np.float32))


def _labels(y: np.ndarray, n: int, path: Path) -> Tuple[Tensor, int]:
    if y.dtype.kind not in "iu" or y.shape != (n,):
        raise JumpflowError(f"{path}: labels must be integers of shape ({n},), found dtype {y.dtype} "
                            f"shape {y.shape}")
    if y.min() < 0:
        raise JumpflowError(f"{path}: labels must be >= 0, found {int(y.min())}")
    y = torch.from_numpy(y.astype(np.int64))
    return y, int(y.max()) + 1


def load_array(path, test_fraction: float = 0.1, seed: int = 0, name: Optional[str] = None, latents: bool = False,
               scale: float = 1.0) -> TensorDataset:
    """Load a .npy/.npz file (rules in the module docstring) as a TensorDataset with a deterministic split."""
    path = Path(path)
    if path.suffix.lower() not in (".npy", ".npz"):
        raise JumpflowError(f"{path}: expected a .npy or .npz file, found suffix {path.suffix!r}")
    if not path.is_file():
        raise JumpflowError(f"file not found: {path}")
    raw, raw_labels = _read(path)
    if scale != 1.0 and not latents:
        raise JumpflowError("scale applies to latents only (data_options.latents=true)")
    x = _latents(raw, path, scale) if latents else _to_tensor(raw, path)
    labels, num_classes = _labels(raw_labels, len(x), path) if raw_labels is not None else (None, 0)
    train, test = split_indices(len(x), test_fraction, seed)
    pick = (lambda i: labels[i]) if labels is not None else (lambda i: None)
    return TensorDataset(name or path.stem, x[train], x[test], pick(train), pick(test), num_classes=num_classes)
