"""Class balance and confidence of generated samples, read through a classifier trained on the real data.

For a class-balanced dataset a good generator spreads its samples over all K classes and produces samples the
classifier recognises. The mode-dropping checks follow the idea of counting modes with a pretrained classifier
(Srivastava et al. 2017, VEEGAN; Metz et al. 2017, unrolled GANs); the confidence term is the "sharpness" half of
the Inception Score (Salimans et al. 2016), reported on its own.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from jumpflow.errors import JumpflowError


def class_metrics(logits: Tensor, num_classes: int) -> Dict[str, float]:
    """Coverage, balance and confidence of the classes predicted for N samples, from logits (N, K).

    With p_c = share of samples whose argmax class is c (K = num_classes):
      * class_coverage = (1 / K) #{c : p_c >= 1 / (2K)}: share of classes that receive at least half of their
        uniform share; 1 for a balanced generator, m / K for one that only produces m classes;
      * class_entropy = -sum_c p_c log p_c / log K (0 log 0 = 0): 1 = perfectly balanced, 0 = a single class;
      * mean_confidence = mean over samples of max_c softmax(logits)_c: near 1 when the classifier is sure of
        every sample, 1 / K when it cannot tell.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise JumpflowError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    logits = torch.as_tensor(logits).detach()
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise JumpflowError(f"logits must have shape (N, {num_classes}) for num_classes = {num_classes}, "
                            f"got {tuple(logits.shape)}")
    if logits.shape[0] < 1:
        raise JumpflowError("class_metrics needs at least one sample")
    logits = logits.to(torch.float64)
    if not torch.isfinite(logits).all():
        raise JumpflowError("logits contain NaN or infinite values")
    labels = logits.argmax(dim=1)
    shares = torch.bincount(labels, minlength=num_classes).to(torch.float64) / labels.numel()  # (K,)
    coverage = (shares >= 0.5 / num_classes).to(torch.float64).mean().item()
    entropy = -torch.special.xlogy(shares, shares).sum().item() / math.log(num_classes)  # + 0.0 below: no "-0.0"
    confidence = torch.softmax(logits, dim=1).max(dim=1).values.mean().item()
    return {"class_coverage": coverage, "class_entropy": max(entropy, 0.0) + 0.0, "mean_confidence": confidence}
