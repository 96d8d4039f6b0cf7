"""Pictures people look at: side-by-side scatter panels for vector data, image grids for images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Panel = Tuple[str, Tensor]  # (title, samples (N, *shape) in data space)


def image_grid(images: Tensor, nrow: Optional[int] = None, pad: int = 1) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one PIL image with the samples tiled row by row."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, top:top + h, left:left + w] = images[i]
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array[..., :3], mode="L" if c == 1 else "RGB")


def panels_figure(panels: Sequence[Panel], title: str = "", limits: Optional[float] = None,
                  columns: Optional[int] = None):
    """A matplotlib figure of panels in rows of `columns` (default: one row): scatter plots (first two coordinates)
    for vectors, a histogram for 1-D data, image grids for images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_image = panels[0][1].dim() == 4
    columns = min(columns or len(panels), len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 + 3.6 * (rows - 1)), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if limits is None and not is_image:
        reference = panels[0][1].float()
        limits = float(reference[:, :2].abs().max()) * 1.15 if reference.shape[1] > 1 else 3.0
    for ax, (name, x) in zip(axes.flat, panels):
        x = x.detach().float().cpu()
        if is_image:
            grid = np.asarray(image_grid(x[:64]))
            ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        elif x.shape[1] == 1:  # 1-D data: a histogram
            ax.hist(x[:, 0].numpy(), bins=80, range=(-limits, limits), color="tab:blue")
            ax.set_xlim(-limits, limits)
        else:
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1.0, alpha=0.5, linewidths=0)
            ax.set_xlim(-limits, limits)
            ax.set_ylim(-limits, limits)
            ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_panels(path: Path, panels: Sequence[Panel], title: str = "", limits: Optional[float] = None,
                columns: Optional[int] = None) -> Path:
    """Panels in rows of `columns` (default: one row): scatter plots (first two coordinates) for vectors, image grids
    for images."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = panels_figure(panels, title, limits, columns)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def samples_image(samples: Tensor, title: str = "") -> Image.Image:
    """A single picture of samples as a PIL image: the image grid for images (one pixel per pixel, 1-pixel white
    borders), a scatter plot of the first two coordinates for vectors (a histogram for 1-D data)."""
    if samples.dim() == 4:
        return image_grid(samples)
    if samples.dim() != 2:
        raise ValueError(f"samples must be (N, D) vectors or (N, C, H, W) images, got shape {tuple(samples.shape)}")
    import matplotlib.pyplot as plt

    fig = panels_figure([(title or f"{samples.shape[0]} samples", samples)])
    fig.set_dpi(110)
    fig.canvas.draw()  # Agg renders into an RGBA buffer: no file round trip
    picture = Image.fromarray(np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    plt.close(fig)
    return picture


def save_samples(path: Path, samples: Tensor) -> Path:
    """A single picture of samples: a grid PNG for images, a scatter PNG for vectors."""
    if samples.dim() == 4:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(samples).save(path)
        return path
    return save_panels(path, [("samples", samples)])


__all__: List[str] = ["image_grid", "panels_figure", "save_panels", "samples_image", "save_samples"]
