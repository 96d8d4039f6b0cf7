"""Sample quality for image datasets, offline: FD on the dataset's own feature net ("FD-digits" for the digits),
k-NN precision/recall and density/coverage on the same features, the feature net's class metrics, and the distance
to the nearest training image (a memorisation check: far below its floor means copies of training images).

Every metric comes with its floor: the same metric for an equal number of real training images against the same
held-out images. FD depends on the sample count, so samples are cut to the held-out split's size (equal N).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from ..errors import JumpflowError
from .classifier_metrics import class_metrics
from .feature_nets import FeatureNet, extract
from .frechet import frechet_distance_from_features
from .manifold import density_coverage, precision_recall

PRECISION_RECALL_K = 3  # Kynkaanniemi et al. 2019
DENSITY_COVERAGE_K = 5  # Naeem et al. 2020
NEAREST_TRAIN_SAMPLES = 1000  # the memorisation check looks at this many samples (all training images each)


def nearest_train_distance(images: Tensor, train: Tensor, block: int = 256) -> float:
    """Mean over images of the root-mean-square pixel distance to the closest training image."""
    flat_train = train.reshape(train.shape[0], -1).float()
    flat = images[:NEAREST_TRAIN_SAMPLES].reshape(min(len(images), NEAREST_TRAIN_SAMPLES), -1).float()
    nearest = torch.cat([torch.cdist(flat[i:i + block], flat_train).min(dim=1).values
                         for i in range(0, flat.shape[0], block)])
    return float((nearest / flat.shape[1] ** 0.5).mean())


def _scores(features: Tensor, logits: Tensor, reference_features: Tensor, num_classes: int) -> Dict[str, float]:
    out = {"fd": frechet_distance_from_features(features, reference_features)}
    out.update(precision_recall(reference_features, features, k=PRECISION_RECALL_K))
    out.update(density_coverage(reference_features, features, k=DENSITY_COVERAGE_K))
    if num_classes:
        out.update(class_metrics(logits, num_classes))
    return out


def checked_samples(samples, dataset) -> Tensor:
    """Samples as float32, refused with a clear message unless shaped like the dataset's and finite."""
    samples = torch.as_tensor(samples, dtype=torch.float32)
    if tuple(samples.shape[1:]) != tuple(dataset.shape):
        raise JumpflowError(f"samples have shape {tuple(samples.shape)} but {dataset.name} has samples of shape "
                            f"{tuple(dataset.shape)}")
    if not torch.isfinite(samples).all():
        raise JumpflowError("samples contain NaN or infinite values")
    return samples


@torch.no_grad()
def evaluate_images(samples: Tensor, dataset, feature_net: FeatureNet, seed: int = 0,
                    n: Optional[int] = None) -> Dict[str, float]:
    """Metrics of samples (N, C, H, W) in [-1, 1] against `dataset`'s held-out split, with `<metric>_floor` entries."""
    samples = checked_samples(samples, dataset)
    n = min(n or len(samples), len(samples), len(dataset.test), len(dataset.train))
    if n < DENSITY_COVERAGE_K + 2:
        raise JumpflowError(f"need at least {DENSITY_COVERAGE_K + 2} samples for image metrics, got {n}")
    samples = samples[:n].clamp(-1, 1)  # what a saved picture would show
    reference = dataset.test[:n]
    pick = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed))[:n]
    real = dataset.train[pick]  # the floor: real images the reference has not seen, equal N

    reference_features, _ = extract(feature_net, reference)
    out = _scores(*extract(feature_net, samples), reference_features, dataset.num_classes)
    floor = _scores(*extract(feature_net, real), reference_features, dataset.num_classes)
    out["nearest_train"] = nearest_train_distance(samples, dataset.train)
    floor["nearest_train"] = nearest_train_distance(reference, dataset.train)
    out.update({f"{k}_floor": v for k, v in floor.items()})
    out["n"] = n
    return out
