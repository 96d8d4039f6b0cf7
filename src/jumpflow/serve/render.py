"""Samples to PNG for the page, fast enough to redraw on every slider move.

Images: the grid of `jumpflow.plots.image_grid`. Vectors: a density-shaded scatter of the first two coordinates (a
histogram for 1-D data) drawn with numpy on a *fixed* frame, measured once per model, so the picture does not jump
about as the seed moves (matplotlib would also cost tens of milliseconds per picture, more than a one-step model).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..plots import image_grid

SIZE = 400  # pixels of the square scatter picture
# A palette picture (one byte a pixel: a third of the work of RGB to draw and to compress): entries 0..INK_LEVELS blend
# white into matplotlib's blue, GRID_INDEX is the light grey of the frame.
INK_LEVELS, GRID_INDEX = 253, 254
_WHITE, _INK, _GREY = np.array([255, 255, 255]), np.array([31, 119, 180]), np.array([225, 229, 233])
PALETTE = np.concatenate([np.round(_WHITE + (_INK - _WHITE) * (np.arange(INK_LEVELS + 1)[:, None] / INK_LEVELS)),
                          _GREY[None], _WHITE[None]]).astype(np.uint8).ravel().tolist()


@dataclass(frozen=True)
class Frame:
    """The square window [center - half, center + half]^2 the scatter shows."""

    center: tuple
    half: float

    @classmethod
    def around(cls, samples: Tensor, quantile: float = 0.995, margin: float = 1.2) -> "Frame":
        """A window holding all but the far tails of `samples` (N, D), with a margin."""
        x = samples.detach().float().cpu().reshape(samples.shape[0], -1)[:, :2]
        center = x.median(0).values
        spread = torch.quantile((x - center).abs().flatten(), quantile).item()
        return cls(tuple(float(c) for c in center), max(spread * margin, 1e-3))


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)  # speed over a few bytes
    return buf.getvalue()


def render(samples: Tensor, frame: Optional[Frame], to_image: Optional[Callable] = None) -> bytes:
    """(N, C, H, W) images in [-1, 1] -> a grid PNG (`to_image`, the model's own picture, where given);
    (N, D) vectors -> a scatter (D >= 2) or histogram (D = 1) PNG in `frame`."""
    if samples.dim() == 4:
        return png_bytes(to_image(samples) if to_image is not None else image_grid(samples))
    x = samples.detach().float().cpu().numpy().reshape(samples.shape[0], -1)
    return png_bytes(_histogram(x[:, 0], frame) if x.shape[1] == 1 else _scatter(x[:, :2], frame))


def _canvas() -> np.ndarray:
    """The empty frame (SIZE, SIZE) of palette indices: quarter lines, a reference that stays put between pictures."""
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for k in range(1, 4):
        canvas[k * SIZE // 4, :] = GRID_INDEX
        canvas[:, k * SIZE // 4] = GRID_INDEX
    canvas[[0, -1], :] = GRID_INDEX  # the frame's edge
    canvas[:, [0, -1]] = GRID_INDEX
    return canvas


EMPTY = _canvas()
DOT = np.array([dr * SIZE + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)])  # 3x3 pixels a point, as flat offsets


def _picture(canvas: np.ndarray) -> Image.Image:
    picture = Image.frombytes("P", (canvas.shape[1], canvas.shape[0]), np.ascontiguousarray(canvas).tobytes())
    picture.putpalette(PALETTE)
    return picture


def _pixels(values: np.ndarray, center: float, half: float) -> np.ndarray:
    return np.floor((values - (center - half)) / (2 * half) * SIZE).astype(np.int64)


def _scatter(x: np.ndarray, frame: Frame) -> Image.Image:
    col, row = _pixels(x[:, 0], frame.center[0], frame.half), SIZE - 1 - _pixels(x[:, 1], frame.center[1], frame.half)
    inside = (col >= 1) & (col < SIZE - 1) & (row >= 1) & (row < SIZE - 1)
    flat = (row[inside] * SIZE + col[inside])[:, None] + DOT
    counts = np.bincount(flat.ravel(), minlength=SIZE * SIZE)
    hit = np.flatnonzero(counts)
    alpha = 1.0 - np.exp(-0.8 * counts[hit])  # overlapping dots darken, like alpha-blended markers
    canvas = EMPTY.ravel().copy()
    canvas[hit] = np.maximum(np.round(alpha * INK_LEVELS), 1).astype(np.uint8)
    return _picture(canvas.reshape(SIZE, SIZE))


def _histogram(x: np.ndarray, frame: Frame, bins: int = 100) -> Image.Image:
    counts, _ = np.histogram(x, bins=bins, range=(frame.center[0] - frame.half, frame.center[0] + frame.half))
    heights = np.round(counts / max(counts.max(), 1) * (SIZE - 10)).astype(np.int64)
    canvas = EMPTY.copy()
    width = SIZE // bins
    for i, h in enumerate(heights):
        if h:
            canvas[SIZE - h:, i * width:(i + 1) * width - 1] = INK_LEVELS
    return _picture(canvas)
