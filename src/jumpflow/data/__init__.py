"""Datasets: built-in toys, Gaussian mixtures, digits, CIFAR-10 (files on disk), and user data (.npy/.npz files,
image folders).

`load(name_or_path, **options)` is the one entry point; `names()` lists the built-in names.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import JumpflowError
from ..registry import Registry
from .arrays import load_array
from .base import Batch, Dataset, SampledDataset, TensorDataset
from .cifar10 import cifar10
from .digits import digits
from .gaussian_mixture import GaussianMixture
from .images import load_image_folder
from .toys import Checkerboard, Moons, Rings, Spirals, eight_gaussians, gmm1d, random_gmm

DATASETS = Registry("dataset")
DATASETS.register("checkerboard")(Checkerboard)
DATASETS.register("8gaussians")(eight_gaussians)
DATASETS.register("moons")(Moons)
DATASETS.register("spirals")(Spirals)
DATASETS.register("rings")(Rings)
DATASETS.register("gmm1d")(gmm1d)
DATASETS.register("gmm")(random_gmm)  # options: dim, n_components, std, seed
DATASETS.register("digits")(digits)
DATASETS.register("cifar10")(cifar10)  # options: root (folder or .tar.gz), n_test; read from disk, never downloaded


def names():
    """Sorted built-in dataset names."""
    return DATASETS.names()


def _call(what: str, factory, options: dict) -> Dataset:
    # Check options against the factory's signature so a typo is a JumpflowError, not a TypeError.
    sig = inspect.signature(factory)
    try:
        sig.bind(**options)
    except TypeError:
        valid = ", ".join(p for p in sig.parameters if p != "self") or "none"
        raise JumpflowError(f"{what} does not take option(s) {sorted(options)}; valid options: {valid}") from None
    return factory(**options)


def load(name_or_path: str, **options) -> Dataset:
    """A built-in dataset by name, a .npy/.npz file (see arrays.py), or a folder of images (see images.py)."""
    name = str(name_or_path)
    if name in DATASETS:
        return _call(f"dataset {name!r}", DATASETS[name], options)
    path = Path(name).expanduser()
    if path.suffix.lower() in (".npy", ".npz"):
        return _call(f"array file {name!r}", load_array, {"path": path, **options})
    if path.is_dir():
        return _call(f"image folder {name!r}", load_image_folder, {"root": path, **options})
    if path.exists():
        raise JumpflowError(f"{path}: unsupported file type {path.suffix!r}; expected a .npy/.npz file or a folder "
                            f"of images")
    try:
        DATASETS[name]
    except JumpflowError as e:
        raise JumpflowError(f"{e}; or a path to a .npy/.npz file or to a folder of images") from None


__all__ = ["DATASETS", "load", "names", "Batch", "Dataset", "SampledDataset", "TensorDataset", "GaussianMixture",
           "Checkerboard", "Moons", "Spirals", "Rings", "eight_gaussians", "gmm1d", "random_gmm", "digits", "cifar10",
           "load_array", "load_image_folder"]
