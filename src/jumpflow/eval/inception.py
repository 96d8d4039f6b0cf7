"""FID with the standard Inception-v3 features (Heusel et al. 2017), through the optional package torch-fidelity.

torch-fidelity's "inception-v3-compat" extractor reproduces the TensorFlow Inception graph of the original FID
code (including its resize to 299 x 299), so numbers are comparable with published FIDs. It takes uint8 images
(B, 3, H, W) in 0..255; we quantise jumpflow's float images in [-1, 1] exactly as a saved PNG would be, since
published FIDs are computed on 8-bit images. Install it with `pip install 'jumpflow[fid]'`.

Every function also accepts any other `extractor`: a callable mapping uint8 (B, 3, H, W) to features (B, F)
(or a tuple/list whose first item is that), so the same path runs with a small stand-in network in tests.
FID is biased upwards at small N (Chong & Forsyth 2020): compare models at the same sample count (50k is usual).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from jumpflow.errors import JumpflowError
from jumpflow.eval.frechet import feature_statistics, frechet_distance, load_statistics

WEIGHTS_ENV = "JUMPFLOW_INCEPTION_WEIGHTS"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FEATURE = "2048"  # the pool3 features FID is defined on

Extractor = Callable[[Tensor], Union[Tensor, Sequence[Tensor]]]
Statistics = Union[str, "os.PathLike[str]", Tuple[np.ndarray, np.ndarray]]

_HOW_TO_PLACE = (f"download {WEIGHTS_URL} on a machine with internet access and either set {WEIGHTS_ENV}=/path/to/"
                 "that .pth file, pass weights_path=..., or copy it into the torch hub cache "
                 "($TORCH_HOME/hub/checkpoints/). Real FID needs these weights; other features give other numbers.")


def load_inception(weights_path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 feature extractor (2048-d pool features), frozen, in eval mode on `device`.

    Weights come from `weights_path`, else from the file named by $JUMPFLOW_INCEPTION_WEIGHTS, else torch.hub
    downloads them (once) into its cache.
    """
    path = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            source = "weights_path" if weights_path is not None else f"${WEIGHTS_ENV}"
            raise JumpflowError(f"Inception weights not found at {path} (from {source}); {_HOW_TO_PLACE}")
    try:  # lazy: torch-fidelity pulls in torchvision, which jumpflow itself does not need
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise JumpflowError("FID with Inception features needs torch-fidelity: pip install 'jumpflow[fid]' "
                            f"(it installs torch-fidelity and torchvision) [{err}]") from err
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURE],
                                                feature_extractor_weights_path=path)
    except Exception as err:  # download (URLError, HTTP), hash mismatch or unreadable file: all mean "no weights"
        raise JumpflowError(f"could not load the Inception weights ({type(err).__name__}: {err}); "
                            f"{_HOW_TO_PLACE}") from err
    return extractor.eval().requires_grad_(False).to(device)


def _check_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images).detach()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise JumpflowError(f"images must be (N, C, H, W) with C = 1 (grey) or 3 (RGB), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise JumpflowError(f"images must be float in [-1, 1] (jumpflow's convention), got {images.dtype}; "
                            "convert uint8 pixels with x.float() / 127.5 - 1")
    return images


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Float images (N, C, H, W) in [-1, 1], C = 1 or 3 -> uint8 (N, 3, H, W), quantised as a saved PNG.

    round((x + 1) * 127.5) after clamping to [-1, 1] (same as jumpflow.plots): -1 -> 0, 0 -> 128, 1 -> 255.
    Grey images are repeated over the three channels, as Inception expects RGB.
    """
    images = _check_images(images)
    if not torch.isfinite(images).all():
        raise JumpflowError("images contain NaN or infinite values")
    pixels = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


@torch.no_grad()
def image_features(images: Tensor, extractor: Extractor, batch_size: int = 200,
                   device: Union[str, torch.device] = "cpu") -> Tensor:
    """Features (N, F), float64 on the CPU, of float images (N, C, H, W) in [-1, 1], computed in batches.

    Each batch is quantised with to_uint8_rgb, moved to `device` (where the extractor must live) and passed to
    `extractor`; a tuple/list output contributes its first item, and features are flattened to (B, F).
    """
    images = _check_images(images)
    if images.shape[0] < 1:
        raise JumpflowError("image_features needs at least one image")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise JumpflowError(f"batch_size must be a positive integer, got {batch_size!r}")
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_uint8_rgb(images[start:start + batch_size]).to(device)
        out = extractor(batch)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != batch.shape[0]:
            raise JumpflowError(f"the extractor must return a tensor (B, F) (or a tuple/list starting with one) "
                                f"for a batch of {batch.shape[0]}, got {type(out).__name__} "
                                f"{tuple(out.shape) if isinstance(out, Tensor) else ''}")
        chunks.append(out.reshape(out.shape[0], -1).to("cpu", torch.float64))
    return torch.cat(chunks)


def image_statistics(images: Tensor, extractor: Optional[Extractor] = None, weights_path: Optional[str] = None,
                     batch_size: int = 200, device: Union[str, torch.device] = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception (or `extractor`) features of images; save them with save_statistics."""
    if extractor is None:
        extractor = load_inception(weights_path, device)
    return feature_statistics(image_features(images, extractor, batch_size, device))


def fid(samples: Tensor, reference: Optional[Tensor] = None, reference_stats: Optional[Statistics] = None,
        extractor: Optional[Extractor] = None, weights_path: Optional[str] = None, batch_size: int = 200,
        device: Union[str, torch.device] = "cpu") -> float:
    """Frechet Inception Distance (Heusel et al. 2017) of samples (N, C, H, W) in [-1, 1] against a reference.

    Give exactly one of `reference` (real images, same convention) or `reference_stats` (an .npz path written by
    save_statistics, or a (mu, sigma) pair). Features come from `extractor`, or from load_inception(weights_path)
    when it is None; reference statistics must have been computed with the same features.
    """
    if (reference is None) == (reference_stats is None):
        raise JumpflowError("fid needs exactly one of reference (real images) or reference_stats "
                            "(an .npz path or a (mu, sigma) pair)")
    _check_images(samples)  # before loading Inception: a wrong shape should not cost a download
    if extractor is None:
        extractor = load_inception(weights_path, device)
    if reference is not None:
        mu_ref, sigma_ref = image_statistics(reference, extractor, batch_size=batch_size, device=device)
    elif isinstance(reference_stats, (str, os.PathLike)):
        mu_ref, sigma_ref = load_statistics(reference_stats)
    elif isinstance(reference_stats, (tuple, list)) and len(reference_stats) == 2:
        mu_ref, sigma_ref = reference_stats
    else:
        raise JumpflowError(f"reference_stats must be an .npz path or a (mu, sigma) pair, "
                            f"got {type(reference_stats).__name__}")
    mu, sigma = image_statistics(samples, extractor, batch_size=batch_size, device=device)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
