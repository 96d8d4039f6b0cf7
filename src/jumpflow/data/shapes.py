"""Procedural shapes: anti-aliased RGB images of a square, circle, triangle or cross on black, with known latents.

Each image has one shape (its class label) and three latent factors drawn from a seeded generator, kept in
`dataset.factors` / `dataset.test_factors` for evaluation (a dict of tensors, one row per image):
  * `colour` (N, 3): the shape's RGB in [COLOUR_LOW, 1] (the background is black, so the shape always shows),
  * `size` (N,): the shape's radius in pixels (circle radius, half side of the square, half arm span of the
    cross, circumradius of the triangle), uniform in [SIZE_LOW, SIZE_HIGH] times the image side,
  * `position` (N, 2): (x, y) of the shape's centre of mass in pixels from the top-left corner (pixel (i, j)
    covers [j, j + 1] x [i, i + 1]), uniform over the positions that keep the whole shape inside the image.
Rendering evaluates each shape's signed distance d (in pixels, negative inside) at the pixel centres and covers
a pixel by clamp(0.5 - d, 0, 1), as in distance-field text rendering (Green 2007, "Improved Alpha-Tested
Magnification for Vector Textures and Special Effects"): the exact covered share of the pixel for axis-aligned
edges, a close one for sloped and curved edges. Polygons use the largest signed distance to their edge lines
(the intersection of half-planes), which is exact up to the corners.

The training and test splits come from two independent streams of the same seed (NumPy SeedSequence([seed, 0])
and ([seed, 1])), so the test set does not depend on `n` and never repeats a training image. Labels are balanced:
each class appears n // 4 or n // 4 + 1 times per split, in a shuffled order. `dataset.feature_net_recipe` makes
the feature net (eval/feature_nets.py) that scores samples much cheaper than the default, which these images
do not need.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor

from ..errors import JumpflowError
from .base import TensorDataset

SHAPE_NAMES = ("square", "circle", "triangle", "cross")  # label k is SHAPE_NAMES[k]
SIZE_LOW, SIZE_HIGH = 0.15, 0.3  # radius range as a fraction of the image side
COLOUR_LOW = 0.3  # darkest channel value of a shape, in [0, 1]
CROSS_ARM = 1 / 3  # the cross's arms are this fraction of its span wide
MIN_SIDE, MAX_SIDE = 8, 256  # below 8 pixels the classes blur together; above 256 one image alone costs > 0.7 MB
FEATURE_NET_IMAGES = 24000  # training images the feature net sees at least (~375 steps of 64): accuracy 1.0
CHUNK = 2048  # images rendered at once: bounds memory to a few (CHUNK, side, side) float32 grids

Factors = Dict[str, Tensor]


def _box(dx: Tensor, dy: Tensor, half_w: Tensor, half_h: Tensor) -> Tensor:
    """Signed distance to an axis-aligned rectangle centred at the origin (exact, corners included)."""
    qx, qy = dx.abs() - half_w, dy.abs() - half_h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def signed_distance(label: int, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Signed distance (pixels) from points offset (dx, dy) from the centre of mass to shape `label` of radius r."""
    if label == 0:  # square
        return _box(dx, dy, r, r)
    if label == 1:  # circle
        return torch.sqrt(dx ** 2 + dy ** 2) - r
    if label == 2:  # equilateral triangle pointing up (y grows downwards): inradius r / 2, centroid at the origin
        s = math.sqrt(3) / 2
        edges = (dy, -s * dx - 0.5 * dy, s * dx - 0.5 * dy)  # outward normals of the bottom, left, right edges
        return torch.stack(edges).amax(0) - r / 2
    if label == 3:  # plus-shaped cross: union of two bars
        arm = r * CROSS_ARM
        return torch.minimum(_box(dx, dy, r, arm), _box(dx, dy, arm, r))
    raise ValueError(f"no shape with label {label}")


def render(labels: Tensor, colour: Tensor, size: Tensor, position: Tensor, side: int) -> Tensor:
    """Images (N, 3, side, side) in [-1, 1] of the given shapes and factors (see the module docstring)."""
    n = labels.shape[0]
    out = torch.empty(n, 3, side, side)
    centres = torch.arange(side, dtype=torch.float32) + 0.5  # pixel centres
    for start in range(0, n, CHUNK):
        sl = slice(start, start + CHUNK)
        lab, pos, r = labels[sl], position[sl].float(), size[sl].float()
        dx = centres[None, None, :] - pos[:, 0, None, None]  # (B, 1, side)
        dy = centres[None, :, None] - pos[:, 1, None, None]  # (B, side, 1)
        dx, dy = torch.broadcast_tensors(dx, dy)  # (B, side, side)
        coverage = torch.empty(dx.shape)
        for k in range(len(SHAPE_NAMES)):  # one vectorised pass per class
            idx = (lab == k).nonzero(as_tuple=True)[0]
            if len(idx):
                d = signed_distance(k, dx[idx], dy[idx], r[idx, None, None])
                coverage[idx] = (0.5 - d).clamp(0.0, 1.0)
        # black background (0) blended with the colour by coverage, then [0, 1] -> [-1, 1]
        out[sl] = 2.0 * coverage[:, None] * colour[sl, :, None, None].float() - 1.0
    return out


def draw_factors(n: int, side: int, rng: np.random.Generator) -> Tuple[Tensor, Factors]:
    """Balanced shuffled labels (n,) and the latent factors of n images, from `rng`."""
    labels = rng.permutation(np.arange(n) % len(SHAPE_NAMES))
    colour = rng.uniform(COLOUR_LOW, 1.0, size=(n, 3))
    size = rng.uniform(SIZE_LOW, SIZE_HIGH, size=n) * side
    # every shape lies inside the square of half side r around its centre of mass: keep that square and a
    # half-pixel margin inside the image, so no shape is cut by the border
    low, high = size + 0.5, side - size - 0.5
    position = low[:, None] + rng.uniform(size=(n, 2)) * (high - low)[:, None]
    factors = {"colour": torch.as_tensor(colour, dtype=torch.float32),
               "size": torch.as_tensor(size, dtype=torch.float32),
               "position": torch.as_tensor(position, dtype=torch.float32)}
    return torch.as_tensor(labels, dtype=torch.int64), factors


def _split(n: int, side: int, seed: int, stream: int) -> Tuple[Tensor, Tensor, Factors]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    labels, factors = draw_factors(n, side, rng)
    return render(labels, factors["colour"], factors["size"], factors["position"], side), labels, factors


def _check_int(name: str, value, low: int, high: float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        limit = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise JumpflowError(f"shapes: {name} must be an integer {limit}, got {value!r}")
    return int(value)


def shapes(n: int = 10000, n_test: int = 1000, size: int = 32, seed: int = 0) -> TensorDataset:
    """`n` training and `n_test` test images (3, size, size) in [-1, 1], labels 0..3 (SHAPE_NAMES), with the latent
    factors in `dataset.factors` / `dataset.test_factors` (module docstring). Deterministic given `seed`."""
    n = _check_int("n", n, 1, math.inf)
    n_test = _check_int("n_test", n_test, 1, math.inf)
    side = _check_int("size", size, MIN_SIDE, MAX_SIDE)
    seed = _check_int("seed", seed, 0, math.inf)
    train, train_labels, factors = _split(n, side, seed, 0)
    test, test_labels, test_factors = _split(n_test, side, seed, 1)
    ds = TensorDataset("shapes", train, test, train_labels, test_labels, num_classes=len(SHAPE_NAMES))
    ds.class_names = list(SHAPE_NAMES)
    ds.factors, ds.test_factors = factors, test_factors
    # Simple shapes need far less than eval/feature_nets.py's default (30 epochs of a 32/64-wide net): measured test
    # accuracy 1.0 for n=10000 at 32x32 in 3 epochs (43 s on one CPU thread, against ~30 min for the default).
    epochs = min(30, max(3, math.ceil(FEATURE_NET_IMAGES / n)))
    ds.feature_net_recipe = {"epochs": epochs, "widths": (16, 32), "feature_dim": 64}
    return ds
