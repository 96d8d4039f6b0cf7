"""What FD-digits can tell apart: the digits feature net's test accuracy, and the image metrics of real training
digits, blurred and pixel-shuffled copies of them, and clamped Gaussian noise against the held-out split, at equal N.
Real training digits also show the memorisation check at work: their nearest-training-image distance is 0.

    python benchmarks/fd_digits.py

Prints a markdown table (copy it to BENCHMARKS.md with the command and the machine).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from jumpflow import data
from jumpflow.eval.feature_nets import feature_net_for
from jumpflow.eval.image_metrics import evaluate_images


def main() -> None:
    digits = data.load("digits")
    net = feature_net_for(digits)
    n = digits.test.shape[0]
    gen = torch.Generator().manual_seed(0)
    real = digits.train[torch.randperm(digits.train.shape[0], generator=gen)[:n]]
    candidates = {
        "real training digits": real,
        "3x3 box blur of them": F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1),
        "their pixels shuffled": real.flatten(1)[:, torch.randperm(64, generator=gen)].view_as(real),
        "Gaussian noise, clamped": torch.randn(real.shape, generator=gen).clamp(-1, 1),
    }
    print(f"machine: {platform.machine()}, torch {torch.__version__}; feature net test accuracy "
          f"{net.test_accuracy:.3f}; N = {n} per side (reference: the held-out split)\n")
    print("| images | FD-digits (↓) | precision (↑) | recall (↑) | density (↑) | coverage (↑) | class entropy (↑) "
          "| NN-train dist |")
    print("|---|---|---|---|---|---|---|---|")
    for name, images in candidates.items():
        m = evaluate_images(images, digits, net)
        print(f"| {name} | {m['fd']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['density']:.3f} "
              f"| {m['coverage']:.3f} | {m['class_entropy']:.3f} | {m['nearest_train']:.3f} |")
    print(f"| (floor: held-out digits' distance to the training set) | | | | | | | {m['nearest_train_floor']:.3f} |")


if __name__ == "__main__":
    main()
