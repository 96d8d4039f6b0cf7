"""The one generic Trainer: loop, AdamW with warm-up and clipping, EMA, autocast, checkpoints, logs, pictures.

It never branches on the method: it asks the method for a loss and for samples. Exact resume: a checkpoint holds the
weights, EMA, optimizer state, torch's global RNG (times, noise, dropout inside methods) and the data generator,
so an interrupted run resumed from step N ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import methods
from .build import DataInfo, Standardizer, build_method, resolve_device
from .checkpoint import (latest_checkpoint, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                         prune_checkpoints, save_checkpoint, split_prefix)
from .config import TrainConfig
from .ema import EMA
from .errors import JumpflowError, TrainingDiverged
from .plots import save_panels

PICTURE_SAMPLES = {"vector": 2000, "image": 64}


def prepare_run_dir(out: Path, resume: bool) -> None:
    """Refuse to train into a run that exists unless resuming: nothing saved is ever overwritten by accident."""
    out = Path(out)
    occupied = out.exists() and any(out.iterdir())
    if occupied and not resume:
        raise JumpflowError(f"run directory {out} already exists and is not empty; pass --resume to continue it "
                            f"or choose another --out")
    if resume and latest_checkpoint(out) is None:
        raise JumpflowError(f"cannot resume: {out} holds no checkpoint")
    out.mkdir(parents=True, exist_ok=True)


def optimizer_prefix(name: str) -> str:
    """Checkpoint key prefix of optimizer `name`: "optim" for the student's (as before several optimizers existed,
    so older checkpoints resume), "optim_NAME" for an auxiliary network's."""
    return "optim" if name == "net" else f"optim_{name}"


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        prepare_run_dir(self.out, resume)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)

        self.dataset = data_lib.load(cfg.data, **cfg.data_options)
        if cfg.class_conditional and self.dataset.num_classes == 0:
            raise JumpflowError(f"class_conditional=true but dataset {self.dataset.name!r} has no labels")
        num_classes = self.dataset.num_classes if cfg.class_conditional else 0
        self.info = DataInfo(self.dataset.name, self.dataset.kind, tuple(self.dataset.shape), num_classes)
        self.scaler = self._fit_scaler()

        self.method = build_method(cfg, self.info).to(self.device)
        if self.method.needs_teacher:  # before the EMA copy: a method may start its student from the teacher
            teacher = self._load_teacher()
            self.scaler = teacher.scaler  # the student lives in its teacher's model space
            self.method.show_progress = cfg.progress  # what it builds from the teacher (a pair cache) shows a bar
            self.method.attach_teacher(teacher, self.out / "teacher")
        elif cfg.teacher:
            raise JumpflowError(f"method {cfg.method!r} trains from data and takes no teacher; distillation methods: "
                                f"{', '.join(methods.distillation_names())}")
        self.ema = EMA(self.method.net, cfg.ema_decay)
        self.method.use_ema(self.ema.shadow)
        self.method.plan(cfg.steps)
        # One AdamW per optimizer the method declares (the student's is "net"), each with its lr multiplier.
        self.optimizers, self.lr_scales, self.params = {}, {}, {}
        for name, (params, scale) in self.method.optimizers().items():
            self.params[name], self.lr_scales[name] = list(params), float(scale)
            self.optimizers[name] = torch.optim.AdamW(self.params[name], lr=cfg.lr * scale,
                                                      betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                      weight_decay=cfg.weight_decay)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        # Fixed noise for the periodic pictures, drawn from its own generator so pictures never shift training RNG.
        picture_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.picture_noise = torch.randn(PICTURE_SAMPLES[self.info.kind], *self.info.shape, generator=picture_gen)
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in training steps, summed over resumes (pictures/saves excluded)
        if resume:
            self._restore(latest_checkpoint(self.out))
        else:
            cfg.save(self.out / "config.yaml")

    def _load_teacher(self):
        from .distill import Teacher

        if not self.cfg.teacher:
            raise JumpflowError(f"method {self.cfg.method!r} distils a teacher: give one (TrainConfig.teacher, "
                                f"`jumpflow distill --teacher RUN_OR_CHECKPOINT`)")
        teacher = Teacher.from_checkpoint(self.cfg.teacher, device=str(self.device))
        if teacher.shape != self.info.shape or teacher.num_classes != self.info.num_classes:
            raise JumpflowError(f"teacher {self.cfg.teacher} models shape {teacher.shape} with "
                                f"{teacher.num_classes} classes; this run's data {self.info.name!r} has shape "
                                f"{self.info.shape} and {self.info.num_classes} classes")
        return teacher

    def _fit_scaler(self) -> Standardizer:
        mode = self.cfg.normalize
        if mode == "auto":
            is_file = not (self.cfg.data in data_lib.names())
            mode = "standard" if is_file and self.dataset.kind == "vector" else "none"
        if mode == "none":
            return Standardizer()
        return Standardizer.fit(self.dataset.train)

    # --- learning-rate schedule --------------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then constant or a cosine decay to 0 at cfg.steps (a resumed run that changes `steps`
        changes the rest of a cosine schedule)."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * warm

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None) -> dict:
        """Train to cfg.steps. `stop_after` ends the loop early without a final checkpoint, like a killed job."""
        cfg = self.cfg
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        # In a log file (not a terminal) redraw rarely: every redraw is a new line there.
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=f"{cfg.method}", unit="it",
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        last = {}
        self._clock_start = time.perf_counter()
        self.method.train()
        while self.step < cfg.steps:
            if stop_after is not None and self.step >= stop_after:
                break
            out_of_time = cfg.time_limit_s and self._tick() >= cfg.time_limit_s
            if out_of_time:  # a wall-clock budget ends the run like a finished one: picture and checkpoint
                self.save_picture()
                self.save()
                break
            x, labels = self.dataset.sample_batch(cfg.batch_size, self.data_generator)
            x = self.scaler.encode(x).to(self.device, non_blocking=True)
            labels = labels.to(self.device) if (labels is not None and self.info.num_classes) else None
            if self.step == 0:
                self._self_check(x, labels)
            records = {}
            for name in self.method.updates(self.step):
                records[name] = self._update(name, x, labels, autocast)
            self.ema.update(self.method.net, self.step)
            self.step += 1
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                loss, grad_norm, metrics = records.get("net") or next(iter(records.values()))
                last = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                        "lr": self.learning_rate(self.step - 1), **{k: float(v) for k, v in metrics.items()}}
                for name, (aux_loss, aux_norm, aux_metrics) in records.items():  # auxiliary networks' updates
                    if name != "net":
                        last.update({f"{name}.loss": aux_loss.item(), f"{name}.grad_norm": aux_norm.item(),
                                     **{f"{name}.{k}": float(v) for k, v in aux_metrics.items()}})
                last["elapsed_s"] = round(self._tick(), 3)
                self._log(last)
                bar.set_postfix(loss=f"{last['loss']:.4g}")
            picture = (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == cfg.steps
            checkpoint = (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == cfg.steps
            if picture or checkpoint:
                self._tick()
                if picture:
                    self.save_picture()
                if checkpoint:
                    self.save()
                self._clock_start = time.perf_counter()  # the time spent saving is not training time
        bar.close()
        return last

    def _update(self, name: str, x, labels, autocast):
        """One optimizer update: loss, backward, clipping, a finite check, step. Returns (loss, grad norm, metrics)."""
        optimizer = self.optimizers[name]
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step) * self.lr_scales[name]
        with autocast:
            out = self.method.update_loss(name, x, labels)
        loss = out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params[name], max_norm)
        # One host sync per update: a NaN loss also makes the gradient norm NaN, so a single check guards both,
        # before the optimizer can write a non-finite value into the weights.
        if not torch.isfinite(loss.detach() + grad_norm):
            what = f"loss is {loss.item()}, gradient norm is {grad_norm.item()}"
            self._diverged(what if name == "net" else f"{name} update: {what}")
        optimizer.step()
        return loss.detach(), grad_norm.detach(), out.metrics

    def _tick(self) -> float:
        """Add the time since the last tick to train_seconds and return it."""
        now = time.perf_counter()
        self.train_seconds += now - self._clock_start
        self._clock_start = now
        return self.train_seconds

    def _self_check(self, x, labels) -> None:
        """The method's own sanity check before training (MeanFlow: exact JVP vs finite difference). It runs on a
        forked RNG so a run's random stream is the same with or without it."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            report = self.method.self_check(x, labels)
        if not report:
            return
        self._log({"step": 0, "self_check": report})
        if not report.get("ok", 1.0):
            raise JumpflowError(f"{self.cfg.method} self-check failed before training: {report}. For a JVP "
                                f"mismatch, an op in the backbone lacks a correct forward-mode rule: try "
                                f"jvp_mode=finite_difference")

    def _diverged(self, what: str) -> None:
        kept = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been written yet"
        raise TrainingDiverged(f"training diverged at step {self.step + 1}: {what}; stopped without saving, {where}. "
                               f"Try a lower lr, a longer warm-up or grad_clip.")

    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- pictures ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, noise: torch.Tensor, steps: int, labels=None) -> torch.Tensor:
        """EMA-weight samples in data space."""
        self.method.eval()
        try:
            z = self.method.sample(noise.to(self.device), steps, labels=labels, net=self.ema.shadow)
        finally:
            self.method.train()
        return self.scaler.decode(z.float().cpu())

    def save_picture(self) -> Path:
        noise = self.picture_noise
        labels = None
        if self.info.num_classes:
            labels = torch.arange(noise.shape[0], device=self.device) % self.info.num_classes
        panels = [("data", self.dataset.reference(noise.shape[0]))]
        limit = self.method.max_sample_steps
        for k in [k for k in self.cfg.sample_steps if limit is None or k <= limit] or [1]:
            panels.append((f"{k} step{'s' if k > 1 else ''} (NFE {self.method.nfe(k)})", self.sample(noise, k, labels)))
        return save_panels(self.out / "samples" / f"step_{self.step:07d}.png", panels,
                           title=f"{self.cfg.method} on {self.info.name}, step {self.step} (EMA)")

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        tensors = {f"model.{k}": v for k, v in self.method.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.shadow.state_dict().items()})
        groups = {}
        for name, optimizer in self.optimizers.items():
            optim_tensors, groups[name] = optimizer_to_tensors(optimizer, optimizer_prefix(name))
            tensors.update(optim_tensors)
        tensors.update(self.scaler.tensors())
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.data_generator.get_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        metadata = {"step": str(self.step), "train_seconds": f"{self.train_seconds:.3f}",
                    "config": json.dumps(self.cfg.to_dict()),
                    "data": json.dumps(self.info.to_dict()),
                    **{optimizer_prefix(name) + "_groups": g for name, g in groups.items()}}
        path = self.out / "checkpoints" / f"step_{self.step:07d}.safetensors"
        save_checkpoint(path, tensors, metadata)
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path

    def _restore(self, path: Path) -> None:
        tensors, metadata = load_checkpoint(path)
        try:
            self.method.load_state_dict(split_prefix(tensors, "model"))
            self.ema.shadow.load_state_dict(split_prefix(tensors, "ema"))
            for name, optimizer in self.optimizers.items():
                prefix = optimizer_prefix(name)
                optimizer_from_tensors(optimizer, tensors, metadata[prefix + "_groups"], prefix)
        except (RuntimeError, KeyError, ValueError) as e:
            raise JumpflowError(f"checkpoint {path} does not match this run's config: {e}") from e
        self.scaler = Standardizer.from_tensors(tensors)
        torch.set_rng_state(tensors["rng.torch"])
        self.data_generator.set_state(tensors["rng.data"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
        self.step = int(metadata["step"])
        self.train_seconds = float(metadata.get("train_seconds", 0.0))
