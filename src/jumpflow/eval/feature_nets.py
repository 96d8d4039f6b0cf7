"""Small per-dataset feature networks: an offline stand-in for Inception in Frechet distance ("FD-digits").

Inception weights cannot be assumed present (nothing is downloaded), and its features mean little on 8x8 digits
anyway. So each labelled image dataset gets a small CNN, trained deterministically on its *training* split: its
penultimate layer (global-average-pooled ReLU activations, like Inception's pool3) gives the features for FD and
precision/recall, and its classifier head scores the classes of generated samples.

The recipe is FeatureNetRecipe() unless the dataset asks for changes (see default_recipe). The trained net is
cached under `cache_dir("feature_nets")`, keyed by the dataset name, a hash of the training images and labels, and
the recipe (version included), so an FD number always comes from the same net.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from jumpflow.cache import cache_dir
from jumpflow.errors import JumpflowError

FORMAT = "jumpflow-feature-net-1"
MIN_SIDE, MAX_SIDE = 8, 64  # below 8 the poolings leave nothing; above 64 use Inception FID, it was made for that
_GROUPS = 8  # GroupNorm groups (no running statistics: train and eval modes compute the same function)


@dataclass(frozen=True)
class FeatureNetRecipe:
    """How a feature net is trained; every field (and `version`) is part of the cache key."""
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak rate, cosine-decayed to 0 over training
    weight_decay: float = 1e-4
    seed: int = 0  # seeds init, shuffling and augmentation (one torch.Generator, in that order)
    feature_dim: int = 128  # width of the penultimate layer = dimension of the FD features
    widths: Tuple[int, ...] = (32, 64)  # channels of the conv stages before the feature layer
    max_shift: int = 1  # random translations of up to this many pixels (0: no augmentation)
    version: str = "1"  # bump when the architecture or training loop changes, so old caches are not reused

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "feature_dim": self.feature_dim}
        for name, value in positive.items():
            if int(value) != value or value < 1:
                raise JumpflowError(f"FeatureNetRecipe.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise JumpflowError(f"FeatureNetRecipe needs lr > 0 and weight_decay >= 0, got lr={self.lr!r}, "
                                f"weight_decay={self.weight_decay!r}")
        if not self.widths or any(int(w) != w or w < 1 for w in self.widths):
            raise JumpflowError(f"FeatureNetRecipe.widths must be positive integers, got {self.widths!r}")
        if int(self.max_shift) != self.max_shift or self.max_shift < 0:
            raise JumpflowError(f"FeatureNetRecipe.max_shift must be an integer >= 0, got {self.max_shift!r}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "widths": list(self.widths)}, sort_keys=True)


def default_recipe(dataset) -> FeatureNetRecipe:
    """FeatureNetRecipe() with the fields a dataset asks for in its `feature_net_recipe` dict (e.g. the procedural
    shapes, whose 10000 32x32 images would take ~30 min on one CPU thread for 30 epochs of the default net).
    Datasets without one (digits, CIFAR-10, files) get the plain default, so their cache keys never change."""
    return FeatureNetRecipe(**getattr(dataset, "feature_net_recipe", None) or {})


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(math.gcd(_GROUPS, c_out), c_out),
                         nn.ReLU())


class FeatureNet(nn.Module):
    """conv stages (two 3x3 conv-GroupNorm-ReLU blocks, then 2x average pooling while the side stays >= 4),
    a 3x3 conv to `feature_dim` channels + global average pool (the features), and a linear classifier.

    Construction never touches the global RNG: weights come from `generator` (default: seeded with 0).
    """

    def __init__(self, shape: Sequence[int], num_classes: int, feature_dim: int = 128,
                 widths: Sequence[int] = (32, 64), generator: Optional[torch.Generator] = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or not all(MIN_SIDE <= s <= MAX_SIDE for s in shape[1:]):
            raise JumpflowError(f"feature nets take images (C, H, W) with H, W in {MIN_SIDE}..{MAX_SIDE}, got shape "
                                f"{shape}; for larger images use Inception FID (pip install 'jumpflow[fid]')")
        if num_classes < 1:
            raise JumpflowError(f"a feature net needs num_classes >= 1, got {num_classes}")
        self.shape, self.num_classes, self.feature_dim = shape, int(num_classes), int(feature_dim)
        self.test_accuracy = float("nan")  # set by train_feature_net / the cache
        self.train_accuracy = float("nan")
        layers, c, side = [], shape[0], min(shape[1:])
        with torch.random.fork_rng(devices=[]):  # nn layers draw their default init from the global RNG
            for width in widths:
                layers += [_conv_block(c, width), _conv_block(width, width)]
                c = width
                if side >= 8:
                    layers.append(nn.AvgPool2d(2))
                    side //= 2
            layers.append(_conv_block(c, feature_dim))
            self.body = nn.Sequential(*layers)
            self.classifier = nn.Linear(feature_dim, num_classes)
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        for m in self.modules():  # fixed module order, so the same generator state gives the same weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear", generator=generator)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim), the FD features."""
        return self.body(x).mean(dim=(2, 3))

    def logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    forward = logits


def _check_dataset(dataset) -> None:
    name = getattr(dataset, "name", "") or type(dataset).__name__
    fid = "use Inception FID instead (pip install 'jumpflow[fid]')"
    if getattr(dataset, "kind", None) != "image" or getattr(dataset, "train", None) is None:
        raise JumpflowError(f"dataset {name!r} is not a finite image dataset (kind {getattr(dataset, 'kind', None)!r});"
                            f" feature nets are trained on labelled images only")
    if getattr(dataset, "train_labels", None) is None or getattr(dataset, "num_classes", 0) < 1:
        raise JumpflowError(f"dataset {name!r} has no class labels, so no feature net can be trained on it; {fid}")
    labels = dataset.train_labels
    if dataset.train.shape[0] < 1:
        raise JumpflowError(f"dataset {name!r} has no training images")
    if labels.shape != (dataset.train.shape[0],):
        raise JumpflowError(f"dataset {name!r}: train_labels has shape {tuple(labels.shape)}, expected "
                            f"({dataset.train.shape[0]},)")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= dataset.num_classes):
        raise JumpflowError(f"dataset {name!r}: labels must lie in 0..{dataset.num_classes - 1}, found "
                            f"{int(labels.min())}..{int(labels.max())}")


def training_data_hash(dataset) -> str:
    """sha256 of the training images (float32) and labels (int64), shape included."""
    h = hashlib.sha256()
    images = dataset.train.detach().to("cpu", torch.float32).contiguous()
    labels = dataset.train_labels.detach().to("cpu", torch.int64).contiguous()
    h.update(repr(tuple(images.shape)).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own (dy, dx) in [-max_shift, max_shift], edges replicated."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=generator)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # (n, h), (n, w) into the padded image
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _accuracy(net: FeatureNet, images: Tensor, labels: Optional[Tensor]) -> float:
    if labels is None or len(labels) == 0:
        return float("nan")
    _, logits = extract(net, images)
    return (logits.argmax(1) == labels.to(logits.device)).double().mean().item()


def train_feature_net(dataset, recipe: Optional[FeatureNetRecipe] = None, progress: bool = False) -> FeatureNet:
    """Train on `dataset.train`/`train_labels` on CPU with one thread, then measure accuracy on the test split
    (`net.test_accuracy`; NaN without test labels).

    CPU and one thread whatever the machine: the thread count changes the order of float reductions (so the
    weights), and oversubscribed threads on a busy machine made training over 10x slower in our measurements.
    """
    _check_dataset(dataset)
    recipe = recipe or default_recipe(dataset)
    recipe.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(dataset, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train(dataset, recipe: FeatureNetRecipe, progress: bool) -> FeatureNet:
    generator = torch.Generator().manual_seed(int(recipe.seed))
    net = FeatureNet(dataset.shape, dataset.num_classes, recipe.feature_dim, recipe.widths, generator=generator)
    images = dataset.train.detach().to("cpu", torch.float32)
    labels = dataset.train_labels.detach().to("cpu", torch.int64)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    net.train()
    step = 0
    bar = tqdm(range(recipe.epochs), disable=not progress, desc=f"feature net ({dataset.name})", unit="epoch")
    for _ in bar:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            x = images[idx]
            if recipe.max_shift:
                x = _random_shift(x, recipe.max_shift, generator)
            for group in optimizer.param_groups:  # cosine decay; last step still learns a little
                group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x), labels[idx])
            if not torch.isfinite(loss):
                raise JumpflowError(f"feature net training diverged (loss {loss.item()}) on {dataset.name!r}; "
                                    f"try a smaller FeatureNetRecipe.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()
    net.train_accuracy = _accuracy(net, images, labels)
    net.test_accuracy = _accuracy(net, dataset.test, getattr(dataset, "test_labels", None))
    return net


def _weights_hash(state: Dict[str, Tensor]) -> str:
    # safetensors has no checksum: a flipped byte in the weights would load silently without this
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(dataset, recipe: FeatureNetRecipe, data_hash: str) -> Path:
    key = hashlib.sha256(json.dumps({"dataset": dataset.name, "data": data_hash, "recipe": recipe.to_json()},
                                    sort_keys=True).encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(dataset.name)).strip("._")[-40:] or "dataset"
    return cache_dir("feature_nets") / f"{stem}-{key[:20]}.safetensors"


def _save(net: FeatureNet, path: Path, dataset, recipe: FeatureNetRecipe, data_hash: str) -> None:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT, "dataset": str(dataset.name), "recipe": recipe.to_json(),
                "num_classes": str(net.num_classes), "shape": json.dumps(list(net.shape)),
                "test_accuracy": repr(net.test_accuracy), "train_accuracy": repr(net.train_accuracy),
                "train_hash": data_hash, "weights_sha256": _weights_hash(state)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # pid: two processes filling the cache do not collide
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:  # the net is still good; only the cache is lost
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the feature net cache {path} ({e}); it will be retrained next time")


def _load(path: Path, dataset, recipe: FeatureNetRecipe, data_hash: str) -> FeatureNet:
    try:
        with safe_open(str(path), framework="pt") as f:  # safetensors: plain tensors, no pickle code runs
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise JumpflowError(f"cached feature net {path} is corrupt ({e})") from e
    expected = {"format": FORMAT, "recipe": recipe.to_json(), "train_hash": data_hash,
                "num_classes": str(dataset.num_classes), "shape": json.dumps(list(dataset.shape))}
    wrong = sorted(k for k, v in expected.items() if metadata.get(k) != v)
    if wrong:
        raise JumpflowError(f"cached feature net {path} does not match this dataset/recipe (fields: {wrong})")
    if metadata.get("weights_sha256") != _weights_hash(state):
        raise JumpflowError(f"cached feature net {path} is corrupt (weights checksum mismatch)")
    net = FeatureNet(dataset.shape, dataset.num_classes, recipe.feature_dim, recipe.widths)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise JumpflowError(f"cached feature net {path} does not fit the network ({e})") from e
    net.test_accuracy = float(metadata.get("test_accuracy", "nan"))
    net.train_accuracy = float(metadata.get("train_accuracy", "nan"))
    return net.eval()


def feature_net_for(dataset, recipe: Optional[FeatureNetRecipe] = None, cache: bool = True,
                    progress: bool = False) -> FeatureNet:
    """The dataset's feature net: loaded from the cache when a matching one is there, else trained (and cached).

    A cached file that is corrupt or does not match is reported with a warning and replaced, never used.
    """
    _check_dataset(dataset)
    recipe = recipe or default_recipe(dataset)
    recipe.validate()
    if not cache:
        return train_feature_net(dataset, recipe, progress=progress)
    data_hash = training_data_hash(dataset)
    path = cache_path(dataset, recipe, data_hash)
    if path.exists():
        try:
            return _load(path, dataset, recipe, data_hash)
        except JumpflowError as e:
            warnings.warn(f"{e}; retraining it")
    net = train_feature_net(dataset, recipe, progress=progress)
    _save(net, path, dataset, recipe, data_hash)
    return net


@torch.no_grad()
def extract(net: FeatureNet, images, batch_size: int = 500) -> Tuple[Tensor, Tensor]:
    """Features (N, feature_dim) and logits (N, num_classes) of images (N, C, H, W) in [-1, 1], computed in eval
    mode on the net's device and returned on the images' device (CPU for numpy input)."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if tuple(x.shape[1:]) != net.shape or x.ndim != 4:
        raise JumpflowError(f"feature net expects images shaped (N, {', '.join(map(str, net.shape))}), got "
                            f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise JumpflowError("images contain NaN or infinite values; cannot compute features")
    if int(batch_size) != batch_size or batch_size < 1:
        raise JumpflowError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    feats, logits = [], []
    for start in range(0, x.shape[0], int(batch_size)):
        f = net.features(x[start:start + batch_size].to(device, torch.float32))
        feats.append(f.to(x.device))
        logits.append(net.classifier(f).to(x.device))
    net.train(was_training)
    if not feats:
        return torch.zeros(0, net.feature_dim), torch.zeros(0, net.num_classes)
    return torch.cat(feats), torch.cat(logits)
