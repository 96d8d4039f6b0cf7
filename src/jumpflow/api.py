"""The Python API the CLI is a thin layer over: train, load, sample, evaluate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from .build import DataInfo, Standardizer, build_method, resolve_device
from .checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, split_prefix
from .config import TrainConfig
from .errors import JumpflowError
from .train import Trainer


RESUMABLE_FIELDS = ("steps", "time_limit_s", "progress", "log_every", "sample_every", "checkpoint_every",
                    "keep_checkpoints")


def train(config: Union[TrainConfig, Dict[str, Any], None], out: Union[str, Path], resume: bool = False,
          stop_after: Optional[int] = None) -> Path:
    """Train a run into `out` (refuses an existing run unless resume=True) and return the latest checkpoint path.

    On resume the run's saved config.yaml is used; `config` (a dict of changes, or a TrainConfig whose fields are
    read) may only change how long to train and how often to log, sample and checkpoint.
    """
    out = Path(out)
    if resume:
        cfg = _resumed_config(config, out)
    else:
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config or {}))
    trainer = Trainer(cfg, out, resume=resume)
    if resume:
        cfg.save(out / "config.yaml")
    trainer.fit(stop_after=stop_after)
    return latest_checkpoint(out) or out


def distill_config(teacher: Union[str, Path], method: str, changes: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The TrainConfig of a student of `teacher` (a checkpoint or run directory): the teacher's data, labels,
    normalisation, backbone and optimisation recipe, with `method` (a distillation method) and `changes` on top.
    `changes` may name TrainConfig fields or, as with `jumpflow train`, options of the method. A student whose
    backbone differs from the teacher's (SlimFlow's smaller student) starts from that backbone's default options."""
    from . import methods
    from .config import apply_overrides

    if method not in methods.names():
        methods.METHODS[method]  # the registry's error lists the valid names
    if not methods.METHODS[method].needs_teacher:
        raise JumpflowError(f"{method!r} trains from data, not from a teacher: use `jumpflow train`; distillation "
                            f"methods: {', '.join(methods.distillation_names())}")
    ckpt = resolve_checkpoint(teacher)
    _, metadata = load_checkpoint(ckpt)
    try:
        values = TrainConfig.from_dict(json.loads(metadata["config"])).to_dict()
    except (KeyError, ValueError) as e:
        raise JumpflowError(f"teacher checkpoint {ckpt} has missing or unreadable metadata: {e}") from e
    changes = dict(changes or {})
    if changes.get("backbone") not in (None, values["backbone"]) and "backbone_options" not in changes:
        values["backbone_options"] = {}
    values.update(method=method, method_options={}, teacher=str(ckpt))
    fields = [f.name for f in dataclasses.fields(methods.METHODS[method].Config)]
    return TrainConfig.from_dict(apply_overrides(values, changes, fields))


def distill(teacher: Union[str, Path], method: str, out: Union[str, Path],
            changes: Optional[Dict[str, Any]] = None, resume: bool = False) -> Path:
    """Distil `teacher` into a one-step student with `method`; like `train`, returns the latest checkpoint path.
    The student samples with `load`/`sample` like any run (its teacher is not needed after training)."""
    if resume:
        return train(changes, out, resume=True)
    return train(distill_config(teacher, method, changes), out)


def _resumed_config(changes, out: Path) -> TrainConfig:
    if not (out / "config.yaml").exists():
        raise JumpflowError(f"cannot resume: {out} has no config.yaml (is it a jumpflow run directory?)")
    saved = TrainConfig.load(out / "config.yaml")
    if isinstance(changes, TrainConfig):
        changes = {k: getattr(changes, k) for k in RESUMABLE_FIELDS}
    changes = dict(changes or {})
    refused = sorted(k for k, v in changes.items() if k not in RESUMABLE_FIELDS and getattr(saved, k, None) != v)
    if refused:
        raise JumpflowError(f"cannot change {', '.join(refused)} when resuming (only {', '.join(RESUMABLE_FIELDS)}); "
                            f"start a new run instead")
    values = saved.to_dict()
    values.update(changes)
    return TrainConfig.from_dict(values)


class LoadedModel:
    """A trained one-step (or multi-step) generator: EMA weights of a checkpoint, ready to sample."""

    def __init__(self, method, info: DataInfo, config: TrainConfig, scaler: Standardizer, step: int,
                 device: torch.device):
        self.method, self.info, self.config, self.scaler = method, info, config, scaler
        self.step, self.device = step, device
        self.train_seconds = 0.0

    @property
    def net(self):
        return self.method.net

    def noise(self, n: int, seed: Optional[int] = None) -> Tensor:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(n, *self.info.shape, generator=gen)

    @torch.no_grad()
    def generate(self, n: Optional[int] = None, steps: Optional[int] = None, seed: Optional[int] = None,
                 noise: Optional[Tensor] = None, cls: Optional[Union[int, Tensor]] = None, **options) -> Tensor:
        """Samples in data space (images: (N, C, H, W) in [-1, 1]). `noise` replaces the drawn starting noise."""
        if noise is None:
            if n is None or n < 1:
                raise JumpflowError(f"n must be a positive integer, got {n!r}")
            noise = self.noise(n, seed)
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(noise.shape[1:]) != self.info.shape:
            expected = ", ".join(map(str, self.info.shape))
            raise JumpflowError(f"noise has shape {tuple(noise.shape)}, expected (N, {expected})")
        labels = self._labels(cls, noise.shape[0])
        steps = steps if steps is not None else self.method.default_sample_steps
        z = self.method.sample(noise.to(self.device), steps, labels=labels, **options)
        return self.scaler.decode(z.float().cpu())

    def _labels(self, cls, n: int) -> Optional[Tensor]:
        if cls is None:
            return None
        if not self.info.num_classes:
            raise JumpflowError("this model is unconditional; it takes no class")
        labels = torch.as_tensor(cls, dtype=torch.long).expand(n).to(self.device)
        if labels.min() < 0 or labels.max() >= self.info.num_classes:
            raise JumpflowError(f"class must be in [0, {self.info.num_classes - 1}], got {cls!r}")
        return labels


def load(path: Union[str, Path], device: str = "auto") -> LoadedModel:
    """Load a checkpoint file or a run directory (latest checkpoint) with its EMA weights."""
    ckpt = resolve_checkpoint(path)
    tensors, metadata = load_checkpoint(ckpt)
    try:
        cfg = TrainConfig.from_dict(json.loads(metadata["config"]))
        info = DataInfo.from_dict(json.loads(metadata["data"]))
    except (KeyError, ValueError) as e:
        raise JumpflowError(f"checkpoint {ckpt} has missing or unreadable metadata: {e}") from e
    method = build_method(cfg, info)
    try:
        method.load_state_dict(split_prefix(tensors, "model"))
        method.net.load_state_dict(split_prefix(tensors, "ema"))  # sample with the EMA weights
    except RuntimeError as e:
        raise JumpflowError(f"checkpoint {ckpt} does not match its own config: {e}") from e
    dev = resolve_device(device)
    model = LoadedModel(method.to(dev).eval(), info, cfg, Standardizer.from_tensors(tensors), int(metadata["step"]),
                        dev)
    model.train_seconds = float(metadata.get("train_seconds", 0.0))  # training time that led to these weights
    return model


def sample(ckpt: Union[str, Path], n: int, steps: Optional[int] = None, seed: Optional[int] = None,
           noise: Optional[Tensor] = None, cls: Optional[int] = None) -> Tensor:
    return load(ckpt).generate(n, steps=steps, seed=seed, noise=noise, cls=cls)


def evaluate(samples: Tensor, data: str, noise: Optional[Tensor] = None, seed: int = 0, **data_options) -> dict:
    """Metrics of `samples` against dataset `data`, each with its real-vs-real floor. Vectors: the toy metrics, and
    with the starting `noise` the flow-map error against the exact map where the dataset has one. Images: FD,
    precision/recall, density/coverage and class metrics on the dataset's cached feature net (trained on first use)."""
    from . import data as data_lib
    from .eval import evaluate_samples
    from .eval.image_metrics import checked_samples

    dataset = data_lib.load(data, **data_options)
    samples = checked_samples(samples, dataset)
    if noise is not None:
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if noise.shape != samples.shape:
            raise JumpflowError(f"noise has shape {tuple(noise.shape)} but samples have {tuple(samples.shape)}")
    if dataset.kind == "image":
        from .eval.feature_nets import feature_net_for
        from .eval.image_metrics import evaluate_images

        return evaluate_images(samples, dataset, feature_net_for(dataset), seed=seed)
    return evaluate_samples(samples, dataset, seed=seed, noise=noise)
