"""How the benchmark scores samples of one dataset: fixed starting noise shared by every method, the metrics that
suit the data (toys: distances, likelihood, support and modes, exact flow map; images: FD on the dataset's feature
net, precision/recall, density/coverage, class metrics, distance to the nearest training image), each beside its
real-vs-real floor."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .. import data as data_lib

# (metric key, column header, "lower"/"higher" is better); the first of each list is the plots' headline metric.
VECTOR_COLUMNS = [("sliced_wasserstein", "SW2", "lower"), ("energy_distance", "energy", "lower"),
                  ("log_likelihood", "log-lik", "higher"), ("support_fraction", "in support", "higher"),
                  ("mode_coverage", "modes", "higher"), ("flow_map_error", "map error", "lower")]
IMAGE_COLUMNS = [("fd", "FD", "lower"), ("precision", "precision", "higher"), ("recall", "recall", "higher"),
                 ("density", "density", "higher"), ("coverage", "coverage", "higher"),
                 ("class_coverage", "classes", "higher"), ("class_entropy", "class entropy", "higher"),
                 ("mean_confidence", "confidence", "higher"), ("nearest_train", "NN-train dist", "floor")]


class DatasetJudge:
    """Everything fixed per dataset: the data, the eval noise (same for all methods), and for images the feature net."""

    def __init__(self, name: str, data_options: Dict, n_eval: int, seed: int):
        self.dataset = data_lib.load(name, **data_options)
        self.kind = self.dataset.kind
        self.seed = seed
        if self.kind == "image":  # FD and friends compare equal sample counts: the held-out split's size at most
            n_eval = min(n_eval, int(self.dataset.test.shape[0]))
            from ..eval.feature_nets import feature_net_for

            self.feature_net = feature_net_for(self.dataset)
        self.n_eval = n_eval
        gen = torch.Generator().manual_seed(seed + 12345)
        self.noise = torch.randn(n_eval, *self.dataset.shape, generator=gen)

    @property
    def columns(self) -> List[Tuple[str, str, str]]:
        return IMAGE_COLUMNS if self.kind == "image" else VECTOR_COLUMNS

    def score(self, samples: Tensor) -> Dict[str, float]:
        """Metrics of samples drawn from `self.noise` (row i from noise row i), with `<metric>_floor` entries."""
        if self.kind == "image":
            from ..eval.image_metrics import evaluate_images

            return evaluate_images(samples, self.dataset, self.feature_net, seed=self.seed)
        from ..eval import evaluate_samples

        noise = self.noise if self.dataset.has_flow_map else None
        return evaluate_samples(samples, self.dataset, seed=self.seed, noise=noise)

    def reference(self) -> Tensor:
        return self.dataset.reference(self.n_eval)
