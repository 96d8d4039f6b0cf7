"""scikit-learn's bundled 8x8 handwritten digits (1797 images, no download): a tiny labelled image set."""

from __future__ import annotations

import torch

from ..errors import JumpflowError
from .base import TensorDataset


def digits(n_test: int = 450, seed: int = 0) -> TensorDataset:
    """Images (1, 8, 8) mapped from [0, 16] to [-1, 1], labels 0..9 (num_classes=10).

    The split is a fixed permutation (torch.Generator seeded with `seed`): the first `n_test` images of it are
    the test set (default 450, leaving 1347 for training, scikit-learn's usual 75/25 split sizes).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise JumpflowError("the digits dataset needs scikit-learn; install it with "
                            "pip install 'jumpflow[digits]'") from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if int(n_test) != n_test or not 1 <= n_test < len(x):
        raise JumpflowError(f"digits: n_test must be an integer in [1, {len(x) - 1}], got {n_test!r}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
    test, train = perm[: int(n_test)], perm[int(n_test):]
    return TensorDataset("digits", x[train], x[test], y[train], y[test], num_classes=10)
