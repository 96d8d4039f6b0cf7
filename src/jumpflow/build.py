"""Rebuild a method (student network included) from a TrainConfig and the data's shape: used by training,
resume and loading a checkpoint, so all three construct exactly the same modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import methods, nets
from .config import TrainConfig
from .errors import JumpflowError
from .methods.base import make_config


@dataclass
class DataInfo:
    """What a checkpoint must know about its data to sample without loading it."""

    name: str
    kind: str  # "vector" or "image"
    shape: tuple
    num_classes: int  # 0 when the model is unconditional

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict) -> "DataInfo":
        return cls(d["name"], d["kind"], tuple(d["shape"]), int(d["num_classes"]))


def backbone_options(cfg: TrainConfig) -> dict:
    """The user's backbone options merged with the ones the method requires (Method.backbone_requirements); a user
    value that contradicts a requirement is an error, not silently overridden."""
    cls = methods.METHODS[cfg.method]
    required = cls.backbone_requirements(make_config(cls.Config, cfg.method_options))
    conflicts = sorted(k for k, v in required.items() if k in cfg.backbone_options and cfg.backbone_options[k] != v)
    if conflicts:
        raise JumpflowError(f"method {cfg.method!r} needs backbone option(s) "
                            + ", ".join(f"{k}={required[k]!r}" for k in conflicts) + "; the config sets "
                            + ", ".join(f"{k}={cfg.backbone_options[k]!r}" for k in conflicts)
                            + " (leave them out: the method sets them)")
    return {**cfg.backbone_options, **required}


def build_method(cfg: TrainConfig, info: DataInfo) -> methods.Method:
    backbone = cfg.backbone or nets.default_backbone(info.shape)
    net = nets.build(backbone, info.shape, info.num_classes, **backbone_options(cfg))
    return methods.get(cfg.method, net, info.shape, info.num_classes, **cfg.method_options)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise JumpflowError(f"unknown device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JumpflowError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


class Standardizer:
    """Per-dimension standardisation for vector data of arbitrary scale; identity when mean/std are None.

    Models train on (x - mean) / std; samples are mapped back so users always see data space.
    """

    def __init__(self, mean: Optional[Tensor] = None, std: Optional[Tensor] = None):
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, x: Tensor) -> "Standardizer":
        return cls(x.mean(0), x.std(0).clamp_min(1e-6))

    def encode(self, x: Tensor) -> Tensor:
        return x if self.mean is None else (x - self.mean.to(x)) / self.std.to(x)

    def decode(self, x: Tensor) -> Tensor:
        return x if self.mean is None else x * self.std.to(x) + self.mean.to(x)

    def tensors(self) -> dict:
        return {} if self.mean is None else {"scaler.mean": self.mean, "scaler.std": self.std}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "Standardizer":
        return cls(tensors.get("scaler.mean"), tensors.get("scaler.std"))
