"""How the benchmark scores samples of one dataset: fixed starting noise shared by every method, the metrics that
suit the data (toys: distances, likelihood, support and modes, exact flow map; images: FD on the dataset's feature
net, precision/recall, density/coverage, class metrics, distance to the nearest training image), each beside its
real-vs-real floor."""

from __future__ import annotations

import hashlib
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

    def __init__(self, name: str, data_options: Dict, n_eval: int, seed: int, inception_fid: bool = False):
        self.dataset = data_lib.load(name, **data_options)
        self.kind = self.dataset.kind
        self.seed = seed
        self.inception = None
        if self.kind == "image":
            from ..eval.feature_nets import feature_net_for

            self.feature_net = feature_net_for(self.dataset)
            if inception_fid:  # before any training: a machine without the weights fails now, not in an hour
                self._load_inception()
            else:  # FD and friends compare equal sample counts: the held-out split's size at most
                n_eval = min(n_eval, int(self.dataset.test.shape[0]))
        self.n_eval = n_eval
        gen = torch.Generator().manual_seed(seed + 12345)
        self.noise = torch.randn(n_eval, *self.dataset.shape, generator=gen)

    def _load_inception(self) -> None:
        """Standard FID: Inception features of all samples against the statistics of the whole training split,
        computed once and cached."""
        from ..build import resolve_device
        from ..cache import cache_dir
        from ..eval.feature_nets import training_data_hash
        from ..eval.frechet import load_statistics, save_statistics
        from ..eval.inception import image_statistics, load_inception

        self.device = resolve_device("auto")
        self.inception = load_inception(device=self.device)
        weights = hashlib.sha256()  # the cached statistics belong to these data and these Inception weights
        for tensor in self.inception.state_dict().values():
            weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = f"{training_data_hash(self.dataset)[:16]}-{weights.hexdigest()[:12]}"
        path = cache_dir("fid_stats") / f"{self.dataset.name}-{key}.npz"
        if not path.exists():
            save_statistics(path, *image_statistics(self.dataset.train, self.inception, device=self.device))
        self.fid_statistics = load_statistics(path)

    @property
    def headline(self) -> List[str]:
        """The metrics the plots show: a distance, then one that SW2/FD alone can hide (likelihood under the exact
        density; recall for mode dropping), then the ground-truth map error where there is one."""
        if self.kind == "image":
            return (["fid"] if self.inception is not None else []) + ["fd", "recall"]
        return ["sliced_wasserstein", "log_likelihood"] + (["flow_map_error"] if self.dataset.has_flow_map else [])

    @property
    def columns(self) -> List[Tuple[str, str, str]]:
        if self.kind == "image":
            return ([("fid", "FID", "lower")] if self.inception is not None else []) + IMAGE_COLUMNS
        return VECTOR_COLUMNS

    def score(self, samples: Tensor) -> Dict[str, float]:
        """Metrics of samples drawn from `self.noise` (row i from noise row i), with `<metric>_floor` entries."""
        if self.kind == "image":
            from ..eval.image_metrics import evaluate_images

            out = evaluate_images(samples, self.dataset, self.feature_net, seed=self.seed)
            if self.inception is not None:
                from ..eval.inception import fid

                out["fid"] = fid(samples, reference_stats=self.fid_statistics, extractor=self.inception,
                                 device=self.device)
            return out
        from ..eval import evaluate_samples

        noise = self.noise if self.dataset.has_flow_map else None
        return evaluate_samples(samples, self.dataset, seed=self.seed, noise=noise)

    def reference(self) -> Tensor:
        return self.dataset.reference(self.n_eval)
