"""Backbones: method-agnostic networks net(x, t, s, cond=None, extra=None) -> tensor shaped like x.

x is (B, *shape); t, s are (B,) times in [0, 1] with s <= t (s == t asks for the instantaneous velocity); cond is an
optional (B,) int64 label in [0, num_classes], num_classes being the null label (cond=None means all null).

Two generic options, on every backbone (a method asks for them through Method.backbone_requirements):
- extra_inputs = k (default 0): k more scalar conditioning inputs; extra is then a required (B, k) float tensor, each
  column embedded by its own Fourier embedder and summed into the conditioning vector (iMF's guidance scale and
  interval). With k = 0, extra must be None.
- heads = n (default 1): n predictions from one shared trunk, concatenated along dim 1: (B, n * D) for vectors,
  (B, n * C, H, W) for images (iMF's average- and instantaneous-velocity heads).
With the defaults the nets are exactly those built before the options existed: same parameters and state-dict keys,
same outputs, so old checkpoints load.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Dict, Tuple

from torch import nn

from ..errors import JumpflowError
from ..registry import Registry
from .dit import DiT
from .embeddings import ConditionEmbedding, TimeEmbedding
from .mlp import MLP
from .unet import UNet

BACKBONES: Registry = Registry("backbone")
BACKBONES.register("mlp")(MLP)
BACKBONES.register("unet")(UNet)
BACKBONES.register("dit")(DiT)

_DATA_KIND = {1: "vectors (D,)", 3: "images (C, H, W)"}


def default_backbone(shape: Tuple[int, ...]) -> str:
    """"mlp" for vectors (D,), "unet" for images (C, H, W)."""
    shape = tuple(shape)
    if len(shape) == 1:
        return "mlp"
    if len(shape) == 3:
        return "unet"
    raise JumpflowError(f"no backbone takes data of shape {shape}; supported: vectors (D,) and images (C, H, W)")


def preset(name: str, shape: Tuple[int, ...]) -> Dict[str, Any]:
    """Architecture options build() uses for `shape` unless the caller overrides them.

    The UNet class defaults (64 channels, mult (1, 2, 2)) suit 8x8/16x16 images and train on a CPU; 32x32 gets the
    DDPM CIFAR-10 net (~36M parameters), 64x64 a deeper ADM-like one. Both want a GPU. The DiT's class default is
    DiT-S/2 (33M); images up to 16x16 get size "cpu/2" (width 128, depth 4, patch 2: 1.2M parameters) that trains on a CPU,
    the size of the digits UNet.
    """
    _ = BACKBONES[name]  # unknown name -> JumpflowError listing the valid ones
    if name == "unet" and len(shape) == 3:
        side = int(shape[-1])
        if side > 32:
            return {"channels": 128, "channel_mult": (1, 2, 3, 4), "attention_resolutions": (16, 8)}
        if side > 16:
            return {"channels": 128, "channel_mult": (1, 2, 2, 2), "attention_resolutions": (16,)}
    if name == "dit" and len(shape) == 3 and int(shape[-1]) <= 16:
        return {"size": "cpu/2"}
    return {}


def option_names(name: str) -> Dict[str, Any]:
    """The options a backbone accepts (besides shape and num_classes) and their class defaults."""
    params = inspect.signature(BACKBONES[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "shape", "num_classes")}


def build(name: str, shape: Tuple[int, ...], num_classes: int = 0, **options) -> nn.Module:
    """Build backbone `name` for data of `shape`; options override preset(name, shape) and the class defaults."""
    cls = BACKBONES[name]
    shape = tuple(int(d) for d in shape)
    if len(shape) != cls.data_rank:
        raise JumpflowError(f"backbone {name!r} takes {_DATA_KIND[cls.data_rank]}, got data of shape {shape}; "
                            f"the default backbone for this shape is {default_backbone(shape)!r}"
                            if len(shape) in _DATA_KIND else
                            f"backbone {name!r} takes {_DATA_KIND[cls.data_rank]}, got data of shape {shape}")
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise JumpflowError(f"unknown option(s) {', '.join(unknown)} for backbone {name!r}; "
                            f"valid: {', '.join(valid)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 0:
        raise JumpflowError(f"num_classes must be a non-negative int, got {num_classes!r}")
    return cls(shape, num_classes=int(num_classes), **{**preset(name, shape), **options})


__all__ = ["BACKBONES", "MLP", "UNet", "DiT", "TimeEmbedding", "ConditionEmbedding", "build", "default_backbone",
           "preset", "option_names"]
