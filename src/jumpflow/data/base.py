"""What every dataset offers the trainer and the evaluation.

Two shapes of data exist: distributions we can sample forever (2D toys, Gaussian mixtures) and finite tensors
(digits, arrays, image folders). Both hand out training batches from a caller-owned `torch.Generator`, so a
run's data order is part of its saved RNG state and resume is exact.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

Batch = Tuple[Tensor, Optional[Tensor]]  # (x: (B, *shape) float32 in data space, labels: (B,) int64 or None)


class Dataset:
    name: str = ""
    kind: str = "vector"  # "vector" (N, D) or "image" (N, C, H, W) in [-1, 1]
    shape: Tuple[int, ...] = ()
    num_classes: int = 0  # 0: unlabelled
    hflip: bool = False  # images only: each training draw is mirrored left-right with probability 1/2 (see load)

    def sample_batch(self, n: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Held-out real samples for metrics (fresh draws for toys, the test split for finite data)."""
        raise NotImplementedError

    # Ground truth, where it exists; `has_*` lets metrics decide what to report.
    has_density = False  # log_prob(x) -> (N,)
    has_flow_map = False  # velocity(z, t), flow_map(z, t, s)
    has_support = False  # in_support(x) -> (N,) bool; also n_modes + mode_of(x) for mode coverage

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no exact density")

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no exact velocity")

    def flow_map(self, z: Tensor, t: float, s: float) -> Tensor:
        raise NotImplementedError(f"{self.name} has no exact flow map")

    def in_support(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no known support")


class SampledDataset(Dataset):
    """A distribution with a sampler: every batch is fresh, the reference set is a fresh draw too."""

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def sample_batch(self, n: int, generator: torch.Generator) -> Batch:
        return self.draw(n, generator), None

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        if generator is None:  # a fixed reference set, distinct from any training seed's stream
            generator = torch.Generator().manual_seed(2**31 - 1)
        return self.draw(n, generator)


class TensorDataset(Dataset):
    """Finite data held in memory: batches are drawn uniformly with replacement from the training split."""

    def __init__(self, name: str, train: Tensor, test: Optional[Tensor] = None,
                 train_labels: Optional[Tensor] = None, test_labels: Optional[Tensor] = None,
                 num_classes: int = 0):
        self.name = name
        self.train = train.float().contiguous()
        self.test = (test if test is not None else train).float().contiguous()
        self.train_labels = train_labels
        self.test_labels = test_labels
        self.num_classes = num_classes
        self.shape = tuple(train.shape[1:])
        self.kind = "image" if len(self.shape) == 3 else "vector"

    def sample_batch(self, n: int, generator: torch.Generator) -> Batch:
        idx = torch.randint(0, self.train.shape[0], (n,), generator=generator)
        labels = self.train_labels[idx] if self.train_labels is not None else None
        x = self.train[idx]
        if self.hflip:  # drawn after the indices, so runs without flips keep their data stream unchanged
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, labels

    def reference(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.test[:n]
