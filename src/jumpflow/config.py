"""The run configuration: everything needed to rebuild a run, saved as `config.yaml` and inside every checkpoint.

Overrides come as `key=value` strings (values parsed as YAML, so `lr=3e-4`, `sample_steps=[1,2]` work). A dotted key
reaches a nested option (`method_options.adaptive_power=0.75`); a bare key that is not a run field but is an option
of the chosen method goes to `method_options` (so `adaptive_power=0.75` works too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .errors import JumpflowError


def validated(cls, values: Dict[str, Any], what: str):
    """Build dataclass `cls` from a mapping, refusing unknown field names (a typo must not be silently ignored),
    then run its validate()."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise JumpflowError(f"unknown {what} field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    obj = cls(**values)
    obj.validate()
    return obj


@dataclass
class TrainConfig:
    method: str = "meanflow"
    method_options: Dict[str, Any] = field(default_factory=dict)
    teacher: Optional[str] = None  # distillation: a flow-matching checkpoint or run directory (jumpflow distill)
    data: str = "checkerboard"  # a built-in dataset name, a .npy/.npz file or an image folder
    data_options: Dict[str, Any] = field(default_factory=dict)
    backbone: Optional[str] = None  # None: mlp for vectors, unet for images
    backbone_options: Dict[str, Any] = field(default_factory=dict)
    class_conditional: bool = False
    normalize: str = "auto"  # "standard" (per-dimension mean/std), "none"; auto: standard for vector files only
    steps: int = 2000
    time_limit_s: float = 0.0  # > 0: stop after this much training time (summed over resumes) even before `steps`
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 100  # linear warm-up, then the schedule below
    lr_schedule: str = "constant"  # "constant" (MeanFlow's recipe) or "cosine" (decay to 0 at `steps`)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # "fp32", "bf16" (autocast; JVPs always run in fp32, so MeanFlow's forward does too) or
    #                          "auto" (bf16 on a CUDA device that supports it, else fp32)
    # Speed switches. None changes what a run computes beyond float rounding; "auto" means "on when the device is CUDA".
    grad_accum: int = 1  # micro-batches per step on each process: batch_size is the GLOBAL batch, split over
    #                      processes x grad_accum equal micro-batches (it must divide); gradients are their mean
    parallel: str = "replicate"  # under torchrun: "replicate" (every rank holds the whole model, gradients all-reduced)
    #                              or "fsdp" (student and EMA sharded over the ranks, fsdp.py); ignored in one process
    compile: Any = False  # True/False/"auto": torch.compile the student backbone's forward (state_dict keys unchanged)
    channels_last: Any = False  # True/False/"auto": channels-last memory for image backbones and batches
    log_every: int = 50
    sample_every: int = 1000  # 0: only at the end
    sample_steps: List[int] = field(default_factory=lambda: [1, 2])
    checkpoint_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 3
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        return validated(cls, values, "config")

    def validate(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise JumpflowError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.time_limit_s, (int, float)) or self.time_limit_s < 0:
            raise JumpflowError(f"time_limit_s must be a number >= 0 (0: no limit), got {self.time_limit_s!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise JumpflowError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise JumpflowError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if not isinstance(self.grad_accum, int) or isinstance(self.grad_accum, bool) or self.grad_accum < 1:
            raise JumpflowError(f"grad_accum must be a positive integer, got {self.grad_accum!r}")
        if self.parallel not in ("replicate", "fsdp"):
            raise JumpflowError(f"parallel must be replicate or fsdp, got {self.parallel!r}")
        for name in ("compile", "channels_last"):
            if getattr(self, name) not in (True, False, "auto"):
                raise JumpflowError(f"{name} must be true, false or auto, got {getattr(self, name)!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise JumpflowError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.normalize not in ("auto", "standard", "none"):
            raise JumpflowError(f"normalize must be auto, standard or none, got {self.normalize!r}")
        if not self.sample_steps or any(not isinstance(k, int) or k < 1 for k in self.sample_steps):
            raise JumpflowError(f"sample_steps must be a list of positive integers, got {self.sample_steps!r}")

    def switch_on(self, name: str, device_type: str) -> bool:
        """Resolve a speed switch (`compile`, `channels_last`): "auto" is on for CUDA only."""
        value = getattr(self, name)
        return device_type == "cuda" if value == "auto" else bool(value)

    def autocast_dtype(self, device_type: str) -> Optional[Any]:
        """torch.bfloat16 when this run autocasts on `device_type`, else None ("auto": bf16 where CUDA supports it)."""
        import torch

        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def save(self, path) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @classmethod
    def load(cls, path) -> "TrainConfig":
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise JumpflowError(f"cannot read config {path}: {e}") from e
        if not isinstance(values, dict):
            raise JumpflowError(f"config {path} is not a mapping of fields")
        return cls.from_dict(values)


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """["lr=3e-4", "method_options.adaptive_power=0.75"] -> {"lr": 3e-4, "method_options.adaptive_power": 0.75}"""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise JumpflowError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise JumpflowError(f"cannot parse the value of {item!r}: {e}") from e
    return out


def apply_overrides(values: Dict[str, Any], overrides: Dict[str, Any], method_fields=()) -> Dict[str, Any]:
    """Return a copy of `values` (a TrainConfig dict) with overrides applied, routing keys as the module doc says."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            if not isinstance(values.get(head), dict):
                raise JumpflowError(f"cannot set {key!r}: {head!r} is not an options mapping")
            values[head][rest] = value
        elif key in known:
            values[key] = value
        elif key in method_fields:
            values.setdefault("method_options", {})[key] = value
        else:
            raise JumpflowError(f"unknown config key {key!r}; valid: {', '.join(sorted(known))} "
                                f"or an option of the method ({', '.join(method_fields) or 'none'})")
    return values
