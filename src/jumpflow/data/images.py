"""A folder of PNG/JPEG images (searched recursively) as a TensorDataset (N, C, resolution, resolution) in [-1, 1].

Each image is converted to RGB (channels=3) or grayscale L (channels=1), center-cropped to a square and
resized with LANCZOS (sharp, little aliasing when shrinking). When every image sits inside an immediate
subfolder of the root, the subfolder names are the classes (label = index in sorted order, names in
`dataset.class_names`); otherwise the data is unlabelled. The split is deterministic (see arrays.split_indices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import JumpflowError
from .arrays import split_indices
from .base import TensorDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _load_one(path: Path, resolution: int, mode: str) -> np.ndarray:
    from PIL import Image

    lanczos = getattr(Image, "Resampling", Image).LANCZOS  # Pillow >= 9.1 moved the constant
    try:
        with Image.open(path) as img:
            img = img.convert(mode)  # forces a full decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise JumpflowError(f"could not read image {path}: {e}") from None
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), lanczos)
    arr = np.asarray(img, dtype=np.float32)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)


def load_image_folder(root, resolution: int = 32, channels: int = 3, test_fraction: float = 0.1, seed: int = 0,
                      name: Optional[str] = None) -> TensorDataset:
    """Load every .png/.jpg/.jpeg under `root` (recursively, sorted paths) as described in the module docstring."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise JumpflowError("loading an image folder needs Pillow: pip install pillow") from None
    root = Path(root)
    if not root.is_dir():
        raise JumpflowError(f"image folder not found: {root}")
    if channels not in (1, 3):
        raise JumpflowError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if int(resolution) != resolution or resolution < 1:
        raise JumpflowError(f"resolution must be a positive integer, got {resolution!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise JumpflowError(f"no images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)")
    mode = "RGB" if channels == 3 else "L"
    x = torch.from_numpy(np.stack([_load_one(p, int(resolution), mode) for p in files])) / 127.5 - 1.0

    rel = [p.relative_to(root).parts for p in files]
    class_names = sorted({r[0] for r in rel}) if all(len(r) >= 2 for r in rel) else []
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[r[0]] for r in rel]) if class_names else None

    train, test = split_indices(len(files), test_fraction, seed)
    pick = (lambda i: labels[i]) if labels is not None else (lambda i: None)
    ds = TensorDataset(name or root.name, x[train], x[test], pick(train), pick(test), num_classes=len(class_names))
    ds.class_names = class_names
    return ds
