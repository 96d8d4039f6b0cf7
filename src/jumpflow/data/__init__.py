"""Datasets: built-in toys, Gaussian mixtures, digits, procedural shapes, CIFAR-10 (files on disk), and user data
(.npy/.npz files, image folders).

`load(name_or_path, **options)` is the one entry point; `names()` lists the built-in names. Every finite image
dataset also takes `hflip=True`: training draws are mirrored left-right with probability 1/2 (the usual
augmentation for natural images, e.g. CIFAR-10 in DDPM, Ho et al. 2020), from the run's data generator.
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
from .shapes import SHAPE_NAMES, shapes
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
DATASETS.register("shapes")(shapes)  # options: n, n_test, size, seed; rendered in memory, labels = shape class

COMMON_OPTIONS = ("hflip",)  # taken by load() itself for every finite image dataset


def names():
    """Sorted built-in dataset names."""
    return DATASETS.names()


def _call(what: str, factory, options: dict) -> Dataset:
    # Check options against the factory's signature so a typo is a JumpflowError, not a TypeError.
    sig = inspect.signature(factory)
    try:
        sig.bind(**options)
    except TypeError:
        valid = ", ".join([p for p in sig.parameters if p != "self"] + list(COMMON_OPTIONS))
        raise JumpflowError(f"{what} does not take option(s) {sorted(options)}; valid options: {valid}") from None
    return factory(**options)


def with_hflip(dataset: Dataset, hflip) -> Dataset:
    """Turn on random horizontal flips of training draws; refused for anything but finite image data."""
    if not isinstance(hflip, bool):
        raise JumpflowError(f"hflip must be true or false, got {hflip!r}")
    if hflip and not (isinstance(dataset, TensorDataset) and dataset.kind == "image"):
        raise JumpflowError(f"hflip mirrors images, but dataset {dataset.name!r} holds {dataset.kind} data "
                            f"of shape {tuple(dataset.shape)}")
    dataset.hflip = hflip
    return dataset


def load(name_or_path: str, **options) -> Dataset:
    """A built-in dataset by name, a .npy/.npz file (see arrays.py), or a folder of images (see images.py).
    `hflip=True` (finite image data only) mirrors each training draw with probability 1/2."""
    hflip = options.pop("hflip", False)
    return with_hflip(_load(str(name_or_path), options), hflip)


def _load(name: str, options: dict) -> Dataset:
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
           "shapes", "SHAPE_NAMES", "load_array", "load_image_folder", "with_hflip"]
