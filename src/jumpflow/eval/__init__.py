"""Evaluation: sample-quality metrics against real data and, where the dataset knows it, the ground truth.

Toy metrics (toy_metrics), Frechet distance on any features (frechet), k-NN precision/recall and density/coverage
(manifold), class balance through a classifier (classifier_metrics), and FID with the standard Inception-v3
through the optional torch-fidelity (inception; imported lazily, so this package never needs it).
"""

from jumpflow.eval.classifier_metrics import class_metrics
from jumpflow.eval.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    load_statistics,
    save_statistics,
)
from jumpflow.eval.inception import fid, image_features, image_statistics, load_inception, to_uint8_rgb
from jumpflow.eval.manifold import density_coverage, knn_radii, precision_recall
from jumpflow.eval.toy_metrics import (
    LOG_PROB_FLOOR,
    energy_distance,
    evaluate_samples,
    flow_map_error,
    mean_log_likelihood,
    mmd,
    mode_balance,
    mode_coverage,
    sliced_wasserstein,
    support_fraction,
)

__all__ = [
    "LOG_PROB_FLOOR",
    "class_metrics",
    "density_coverage",
    "energy_distance",
    "evaluate_samples",
    "feature_statistics",
    "fid",
    "flow_map_error",
    "frechet_distance",
    "frechet_distance_from_features",
    "image_features",
    "image_statistics",
    "knn_radii",
    "load_inception",
    "load_statistics",
    "mean_log_likelihood",
    "mmd",
    "mode_balance",
    "mode_coverage",
    "precision_recall",
    "save_statistics",
    "sliced_wasserstein",
    "support_fraction",
    "to_uint8_rgb",
]
