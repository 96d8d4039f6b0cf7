"""The Python API the CLI is a thin layer over: train, load, sample, evaluate, and share (from_pretrained)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import nets
from .build import DataInfo, Standardizer, build_method, resolve_device
from .checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, split_prefix
from .config import TrainConfig
from .errors import JumpflowError
from .train import Trainer


# grad_accum stays out: it changes the run's random streams. The speed switches change only speed and rounding.
RESUMABLE_FIELDS = ("steps", "time_limit_s", "progress", "log_every", "sample_every", "checkpoint_every",
                    "keep_checkpoints", "compile", "channels_last", "precision")


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
    if resume and trainer.is_main:  # under torchrun only rank 0 writes
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


STEP_COUNT_CAP = 128  # the longest power-of-two step count describe() lists for a method with no limit of its own


class LoadedModel:
    """A trained one-step (or multi-step) generator: EMA weights of a checkpoint, ready to sample.

    Made by `load` (a checkpoint, a run directory or an exported directory) or `from_pretrained` (also a Hugging Face
    repo id). `generate` samples, `describe` says what it is, `to_image`/`save_png` make a picture of samples, and
    `save_pretrained`/`push_to_hub` share it (see `jumpflow.hub`)."""

    def __init__(self, method, info: DataInfo, config: TrainConfig, scaler: Standardizer, step: int,
                 device: torch.device):
        self.method, self.info, self.config, self.scaler = method, info, config, scaler
        self.step, self.device = step, device
        self.train_seconds = 0.0
        self.source: Optional[Path] = None  # the checkpoint file or exported directory the weights came from
        self.measurements: Optional[dict] = None  # what an export carried over from its run (model card metrics)

    @property
    def net(self):
        return self.method.net

    def noise(self, n: int, seed: Optional[int] = None) -> Tensor:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(n, *self.info.shape, generator=gen)

    @torch.no_grad()
    def generate(self, n: Optional[int] = None, steps: Optional[int] = None, seed: Optional[int] = None,
                 cls: Optional[Union[int, Tensor]] = None, guidance: Optional[float] = None,
                 noise: Optional[Tensor] = None, batch_size: Optional[int] = None, **options) -> Tensor:
        """Samples in data space (images: (N, C, H, W) in [-1, 1]). `noise` replaces the drawn starting noise.

        `seed` fixes the starting noise (drawn on the CPU, so the same on every machine) and the sampler's own
        randomness (multistep consistency sampling re-noises), without touching torch's global RNG. `guidance` is the
        classifier-free guidance scale of methods whose sampler takes one (`describe()["guidance"]`). `batch_size`
        runs the network on that many rows at a time (50k-sample evaluations); deterministic samplers give the same
        samples at any batch size."""
        if noise is None:
            if n is None or n < 1:
                raise JumpflowError(f"n must be a positive integer, got {n!r}")
            noise = self.noise(n, seed)
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(noise.shape[1:]) != self.info.shape:
            expected = ", ".join(map(str, self.info.shape))
            raise JumpflowError(f"noise has shape {tuple(noise.shape)}, expected (N, {expected})")
        labels = self._labels(cls, noise.shape[0])
        self._check_options(options)
        if guidance is not None:
            options["guidance"] = self._guidance(guidance, labels)
        steps = steps if steps is not None else self.method.default_sample_steps
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise JumpflowError(f"batch_size must be a positive integer, got {batch_size!r}")
        chunks = range(0, noise.shape[0], batch_size or max(1, noise.shape[0]))
        devices = [self.device] if self.device.type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for i in chunks:
                rows = slice(i, i + (batch_size or noise.shape[0]))
                z = self.method.sample(noise[rows].to(self.device), steps,
                                       labels=None if labels is None else labels[rows], **options)
                out.append(self.scaler.decode(z.float().cpu()))
        return torch.cat(out) if len(out) > 1 else out[0]

    @torch.no_grad()
    def generate_across_ranks(self, noise: Tensor, seed: Optional[int] = None, **kwargs) -> Tensor:
        """`generate` with the rows of `noise` split over the processes of a torchrun launch and the samples gathered
        (every rank returns all of them, in order). Rank r seeds its sampler's own randomness with seed + r, so
        deterministic samplers give exactly the single-process samples. Without torchrun it is `generate`."""
        from . import distributed

        world = distributed.setup(self.device)
        if not world.active:
            return self.generate(noise=noise, seed=seed, **kwargs)
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if noise.shape[0] < world.size:
            raise JumpflowError(f"{noise.shape[0]} samples cannot be split over {world.size} processes")
        part = torch.tensor_split(noise, world.size)[world.rank]
        mine = self.generate(noise=part, seed=None if seed is None else seed + world.rank, **kwargs)
        # gloo gathers CPU tensors, nccl CUDA ones: gather on the model's device
        return distributed.gather_rows(mine.to(self.device).contiguous(), noise.shape[0], world).cpu()

    def _labels(self, cls, n: int) -> Optional[Tensor]:
        if cls is None:
            return None
        if not self.info.num_classes:
            raise JumpflowError("this model is unconditional; it takes no class")
        labels = torch.as_tensor(cls, dtype=torch.long).expand(n).to(self.device)
        if labels.min() < 0 or labels.max() >= self.info.num_classes:
            raise JumpflowError(f"class must be in [0, {self.info.num_classes - 1}], got {cls!r}")
        return labels

    def sampling_options(self) -> List[str]:
        """The method's own sampling options (iMF: guidance, interval), beyond noise, steps, labels and net."""
        params = inspect.signature(self.method.sample).parameters
        return [k for k, p in params.items() if k not in ("noise", "steps", "labels", "net")
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def _check_options(self, options: Dict[str, Any]) -> None:
        params = inspect.signature(self.method.sample).parameters.values()
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return  # the method checks its own options
        unknown = sorted(set(options) - set(self.sampling_options()))
        if unknown:
            valid = ", ".join(self.sampling_options()) or "none"
            raise JumpflowError(f"{self.config.method} sampling has no option {', '.join(unknown)}; valid: {valid}")

    @property
    def accepts_guidance(self) -> bool:
        """Classifier-free guidance needs a sampler with a `guidance` option and a class-conditional model."""
        return bool(self.info.num_classes) and "guidance" in inspect.signature(self.method.sample).parameters

    def _guidance(self, guidance, labels: Optional[Tensor]) -> float:
        if not self.accepts_guidance:
            why = ("it is unconditional" if not self.info.num_classes
                   else f"{self.config.method} sampling has no guidance option")
            raise JumpflowError(f"this model takes no guidance ({why}); leave guidance out")
        if labels is None:
            raise JumpflowError("guidance steers towards a class: give one (cls=...)")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise JumpflowError(f"guidance must be a finite number, got {guidance!r}")
        return float(guidance)

    def step_rule(self) -> Tuple[Optional[int], bool]:
        """(the most sampling steps the method was trained for, None = any; whether they must be powers of two)."""
        limit, power_of_two = type(self.method).max_sample_steps, False
        if hasattr(self.method, "check_shortcut_steps"):  # shortcut models: d = 1/K with K a power of two
            limit, power_of_two = self.method.config.max_resolution, True
        return limit, power_of_two

    def supported_steps(self) -> List[int]:
        """1, 2, 4, ... up to the method's limit (STEP_COUNT_CAP when it has none), plus its default count."""
        limit, power_of_two = self.step_rule()
        cap = limit if limit is not None else STEP_COUNT_CAP
        steps = [2 ** i for i in range(cap.bit_length()) if 2 ** i <= cap]
        default = self.method.default_sample_steps
        if default not in steps and (limit is None or default <= limit) and not power_of_two:
            steps.append(default)
        return sorted(steps)

    def describe(self) -> Dict[str, Any]:
        """What this model is and how it samples, as plain JSON-able values."""
        from . import __version__

        cls = type(self.method)
        steps = self.supported_steps()
        limit, power_of_two = self.step_rule()
        return {
            "method": self.config.method, "kind": cls.kind, "paper": cls.paper,
            "summary": (cls.__doc__ or "").strip().split("\n")[0],
            "data": {"name": self.info.name, "kind": self.info.kind, "shape": list(self.info.shape)},
            "num_classes": self.info.num_classes, "classes": list(range(self.info.num_classes)),
            "steps": steps, "nfe": [self.method.nfe(k) for k in steps], "default_steps": cls.default_sample_steps,
            "max_steps": limit, "power_of_two_steps": power_of_two,
            "guidance": self.accepts_guidance,
            "backbone": self.config.backbone or nets.default_backbone(self.info.shape),
            "parameters": sum(p.numel() for p in self.net.parameters()),
            "training_step": self.step, "train_seconds": round(self.train_seconds, 3),
            "jumpflow_version": __version__,
        }

    # --- pictures -------------------------------------------------------------------------------------------------
    def to_image(self, samples: Tensor, title: str = ""):
        """A PIL image of samples from `generate`: a grid for images, a scatter plot for vectors."""
        from .plots import samples_image

        return samples_image(self._checked_samples(samples), title)

    def save_png(self, samples: Tensor, path: Union[str, Path], title: str = "") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_image(samples, title).save(path, format="PNG")
        return path

    def _checked_samples(self, samples) -> Tensor:
        samples = torch.as_tensor(samples).detach().float().cpu()
        if tuple(samples.shape[1:]) != self.info.shape or samples.shape[0] < 1:
            expected = ", ".join(map(str, self.info.shape))
            raise JumpflowError(f"samples have shape {tuple(samples.shape)}, expected (N, {expected})")
        return samples

    # --- sharing --------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path], overwrite: bool = False) -> Path:
        """Write config.json, model.safetensors (EMA weights, scaler) and a model card README.md (see jumpflow.hub)."""
        from .hub import save_pretrained

        return save_pretrained(self, directory, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: Optional[str] = None, revision: Optional[str] = None) -> str:
        """Upload the save_pretrained files to a Hugging Face model repo (created if missing); returns its URL."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision)


def assemble(cfg: TrainConfig, info: DataInfo, scaler: Standardizer, step: int, train_seconds: float,
             device: str, source: Path, restore) -> LoadedModel:
    """Build the method of `cfg` and let `restore(method)` load its weights (raising RuntimeError/KeyError/ValueError
    on a mismatch), then move it to `device` in eval mode."""
    method = build_method(cfg, info)
    try:
        restore(method)
    except (RuntimeError, KeyError, ValueError) as e:
        raise JumpflowError(f"{source} does not match its own config: {e}") from e
    dev = resolve_device(device)
    model = LoadedModel(method.to(dev).eval(), info, cfg, scaler, int(step), dev)
    model.train_seconds = float(train_seconds)  # training time that led to these weights
    model.source = Path(source)
    return model


def load(path: Union[str, Path], device: str = "auto") -> LoadedModel:
    """Load a checkpoint file, a run directory (latest checkpoint) or an exported directory (`save_pretrained`'s
    Hub layout, or a diffusers export) with its EMA weights."""
    from . import hub

    if hub.looks_like_export(path):
        return hub.load_export(path, device)
    if Path(path).name == hub.WEIGHTS_FILE and hub.looks_like_export(Path(path).parent):  # DIR/model.safetensors
        return hub.load_export(Path(path).parent, device)
    ckpt = resolve_checkpoint(path)
    tensors, metadata = load_checkpoint(ckpt)
    try:
        cfg = TrainConfig.from_dict(json.loads(metadata["config"]))
        info = DataInfo.from_dict(json.loads(metadata["data"]))
    except (KeyError, ValueError) as e:
        raise JumpflowError(f"checkpoint {ckpt} has missing or unreadable metadata: {e}") from e

    def restore(method) -> None:
        method.load_state_dict(split_prefix(tensors, "model"))
        method.net.load_state_dict(split_prefix(tensors, "ema"))  # sample with the EMA weights

    return assemble(cfg, info, Standardizer.from_tensors(tensors), int(metadata["step"]),
                    float(metadata.get("train_seconds", 0.0)), device, ckpt, restore)


def from_pretrained(name_or_path: Union[str, Path], device: str = "auto", revision: Optional[str] = None,
                    token: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None) -> LoadedModel:
    """A local directory (or checkpoint, run directory), read offline, or a Hugging Face repo id ("owner/name"),
    downloaded through huggingface_hub (`pip install 'jumpflow[hub]'`)."""
    from .hub import from_pretrained as hub_from_pretrained

    return hub_from_pretrained(name_or_path, device=device, revision=revision, token=token, cache_dir=cache_dir)


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
