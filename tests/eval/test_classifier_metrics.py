"""class_metrics on constructed logits whose coverage, entropy and confidence are known exactly."""

import math

import pytest
import torch

from jumpflow.errors import JumpflowError
from jumpflow.eval import class_metrics

K = 10


def confident(labels, margin=50.0):
    """Logits that put (almost) all probability on the given labels."""
    return torch.nn.functional.one_hot(torch.as_tensor(labels), K).float() * margin


def test_balanced_confident_predictions():
    out = class_metrics(confident(torch.arange(200) % K), K)
    assert out["class_coverage"] == 1.0
    assert out["class_entropy"] == pytest.approx(1.0, abs=1e-12)
    assert out["mean_confidence"] == pytest.approx(1.0, abs=1e-12)


def test_single_class():
    out = class_metrics(confident(torch.full((100,), 3)), K)
    assert out["class_coverage"] == pytest.approx(0.1)
    assert out["class_entropy"] == 0.0


def test_half_the_classes_and_threshold():
    # Classes 0..4 equally: entropy log 5 / log 10, coverage 0.5.
    out = class_metrics(confident(torch.arange(100) % 5), K)
    assert out["class_coverage"] == pytest.approx(0.5)
    assert out["class_entropy"] == pytest.approx(math.log(5) / math.log(10), rel=1e-12)
    # 1000 samples: a class with 50 (= 1/(2K)) counts as covered, one with 49 does not.
    labels = torch.cat([torch.zeros(50), torch.ones(49), torch.full((901,), 2)]).long()
    assert class_metrics(confident(labels), K)["class_coverage"] == pytest.approx(0.2)


def test_uninformative_logits():
    out = class_metrics(torch.zeros(30, K), K)
    assert out["mean_confidence"] == pytest.approx(1 / K)


def test_clear_errors():
    with pytest.raises(JumpflowError, match=r"\(N, 10\)"):
        class_metrics(torch.zeros(5, 9), K)
    with pytest.raises(JumpflowError, match=">= 2"):
        class_metrics(torch.zeros(5, 1), 1)
    with pytest.raises(JumpflowError, match="NaN"):
        class_metrics(torch.full((5, K), float("nan")), K)
