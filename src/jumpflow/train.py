"""The one generic Trainer: loop, AdamW with warm-up and clipping, EMA, autocast, checkpoints, logs, pictures.

It never branches on the method: it asks the method for a loss and for samples. Exact resume: a checkpoint holds the
weights, EMA, optimizer state, torch's global RNG (times, noise, dropout inside methods) and the data generator,
so an interrupted run resumed from step N ends with bit-identical weights on CPU.

Data parallel (`torchrun --nproc_per_node N -m jumpflow train ...`, see distributed.py): `batch_size` is the global
batch; every rank draws it from the same data generator and keeps its own rows, computes its loss on them (in
`grad_accum` micro-batches), and gradients are averaged by all-reduce after backward, so every rank applies the same
update to the same weights and EMA. Rank 0 alone writes files and shows progress. With `parallel=fsdp` the student,
its EMA and any EMA target net are sharded instead (fsdp.py): their gradients are reduce-scattered by FSDP, the rest
(auxiliary networks, the loss) still goes through the all-reduce, and checkpoints gather whole tensors.
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
from . import distributed, fsdp, methods
from .build import DataInfo, Standardizer, build_method, resolve_device
from .checkpoint import (latest_checkpoint, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                         prune_checkpoints, save_checkpoint, split_prefix)
from .config import TrainConfig
from .ema import EMA
from .errors import JumpflowError, TrainingDiverged
from .plots import save_panels

PICTURE_SAMPLES = {"vector": 2000, "image": 64}


def prepare_run_dir(out: Path, resume: bool, create: bool = True) -> None:
    """Refuse to train into a run that exists unless resuming: nothing saved is ever overwritten by accident.
    `create=False` only checks (ranks other than 0)."""
    out = Path(out)
    occupied = out.exists() and any(out.iterdir())
    if occupied and not resume:
        raise JumpflowError(f"run directory {out} already exists and is not empty; pass --resume to continue it "
                            f"or choose another --out")
    if resume and latest_checkpoint(out) is None:
        raise JumpflowError(f"cannot resume: {out} holds no checkpoint")
    if create:
        out.mkdir(parents=True, exist_ok=True)


def optimizer_prefix(name: str) -> str:
    """Checkpoint key prefix of optimizer `name`: "optim" for the student's (as before several optimizers existed,
    so older checkpoints resume), "optim_NAME" for an auxiliary network's."""
    return "optim" if name == "net" else f"optim_{name}"


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        self.device = resolve_device(cfg.device)
        self.world = distributed.setup(self.device)
        self.device = distributed.device_for(self.device, self.world)
        self.shards = self.world.size * cfg.grad_accum  # micro-batches of the global batch per step, all ranks
        if cfg.batch_size % self.shards:
            raise JumpflowError(f"batch_size {cfg.batch_size} is the global batch and must divide into world size "
                                f"{self.world.size} x grad_accum {cfg.grad_accum} = {self.shards} equal micro-batches")
        # Every rank checks before any rank writes, so all of them see the same directory and agree.
        prepare_run_dir(self.out, resume, create=False)
        distributed.barrier(self.world)
        if self.world.is_main:
            prepare_run_dir(self.out, resume)
        torch.manual_seed(cfg.seed)

        self.dataset = data_lib.load(cfg.data, **cfg.data_options)
        if cfg.class_conditional and self.dataset.num_classes == 0:
            raise JumpflowError(f"class_conditional=true but dataset {self.dataset.name!r} has no labels")
        num_classes = self.dataset.num_classes if cfg.class_conditional else 0
        self.info = DataInfo(self.dataset.name, self.dataset.kind, tuple(self.dataset.shape), num_classes)
        self.scaler = self._fit_scaler()

        self.method = build_method(cfg, self.info).to(self.device)
        self.sharded = cfg.parallel == "fsdp" and self.world.active
        if self.sharded and cfg.channels_last is True:
            raise JumpflowError("channels_last=true cannot be combined with parallel=fsdp: FSDP shards contiguous "
                                "parameters only; drop one (channels_last=auto turns itself off under FSDP)")
        self.channels_last = (cfg.switch_on("channels_last", self.device.type) and self.info.kind == "image"
                              and not self.sharded)
        if self.channels_last:  # before the EMA copy, so sampling with EMA weights is channels-last too
            self.method.to(memory_format=torch.channels_last)
        if self.method.needs_teacher:  # before the EMA copy: a method may start its student from the teacher
            teacher = self._load_teacher()
            self.scaler = teacher.scaler  # the student lives in its teacher's model space
            # what it builds from the teacher (a pair cache) shows a bar
            self.method.show_progress = cfg.progress and self.world.is_main
            # Rank 0 first: what it builds on disk (a pair cache) the others then find there and only read.
            if not self.world.is_main:
                distributed.barrier(self.world)
            self.method.attach_teacher(teacher, self.out / "teacher")
            if self.world.is_main:
                distributed.barrier(self.world)
        elif cfg.teacher:
            raise JumpflowError(f"method {cfg.method!r} trains from data and takes no teacher; distillation methods: "
                                f"{', '.join(methods.distillation_names())}")
        distributed.broadcast_module(self.method, self.world)  # one model on every rank, whatever built it
        self.ema = EMA(self.method.net, cfg.ema_decay)
        self.method.use_ema(self.ema.shadow)
        if self.sharded:  # before compile and the optimizers, which must see the sharded parameters
            if not resume:  # the check copies the model, which a sharded one refuses: check it whole, first
                self._self_check(*self._to_device(*self.dataset.sample_batch(
                    cfg.batch_size // self.shards, torch.Generator().manual_seed(cfg.seed + 2))))
            fsdp.shard(self.method.net, self.device, self.world.size)
            for module in [self.ema.shadow, *self.method.mirrors()]:
                fsdp.shard(module, self.device, self.world.size, trains=False)
        if cfg.switch_on("compile", self.device.type):  # after the EMA copy: only the training forward compiles
            self.method.net.compile()  # in place: state_dict keys (checkpoints) stay those of the plain module
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
        local = range(self.world.rank * cfg.grad_accum, (self.world.rank + 1) * cfg.grad_accum)
        self.streams = distributed.ShardStreams(cfg.seed, local, self.shards, self.device)
        self.step = 0
        self._calls_this_step = 0  # losses computed so far in the current step (Method.begin_step)
        self.train_seconds = 0.0  # wall time spent in training steps, summed over resumes (pictures/saves excluded)
        if resume:
            self._restore(latest_checkpoint(self.out))
        elif self.world.is_main:
            cfg.save(self.out / "config.yaml")

    @property
    def is_main(self) -> bool:
        """True in the process that writes files (rank 0; the only process without torchrun)."""
        return self.world.is_main

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
        dtype = cfg.autocast_dtype(self.device.type)
        autocast = torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        # In a log file (not a terminal) redraw rarely: every redraw is a new line there.
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=f"{cfg.method}", unit="it",
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
        last = {}
        self._clock_start = time.perf_counter()
        self.method.train()
        while self.step < cfg.steps:
            if stop_after is not None and self.step >= stop_after:
                break
            # Rank 0's clock decides for all: ranks that stopped at different steps would wait on each other forever.
            out_of_time = cfg.time_limit_s and (distributed.broadcast_float(self._tick(), self.world, self.device)
                                                >= cfg.time_limit_s)
            if out_of_time:  # a wall-clock budget ends the run like a finished one: picture and checkpoint
                self.save_picture()
                self.save()
                break
            micro = self._micro_batches()
            if self.step == 0 and not self.sharded:
                self._self_check(*micro[0][1:])
            records, self._calls_this_step = {}, 0
            for name in self.method.updates(self.step):
                records[name] = self._update(name, micro, autocast)
            if self.sharded:  # a forward without backward (a fake-score update's) leaves the root gathered
                self.method.net.reshard()
            self.ema.update(self.method.net, self.step)
            self.step += 1
            bar.update(1)

            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                loss, grad_norm, metrics = records.get("net") or next(iter(records.values()))
                last = {"step": self.step, "loss": loss.item(), "grad_norm": grad_norm.item(),
                        "lr": self.learning_rate(self.step - 1), **self._metrics(metrics)}
                for name, (aux_loss, aux_norm, aux_metrics) in records.items():  # auxiliary networks' updates
                    if name != "net":
                        last.update({f"{name}.loss": aux_loss.item(), f"{name}.grad_norm": aux_norm.item(),
                                     **{f"{name}.{k}": v for k, v in self._metrics(aux_metrics).items()}})
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
        distributed.barrier(self.world)  # every rank returns once rank 0's last checkpoint is on disk
        return last

    def _micro_batches(self) -> list:
        """This rank's micro-batches of the global batch: [(slot, x, labels)], slot = index among all ranks' ones.
        Every rank draws the whole global batch from the same data generator (one data stream, saved once) and keeps
        its rows: rank r holds slots r*grad_accum ... (r+1)*grad_accum - 1, in the order one process would use."""
        cfg, world = self.cfg, self.world
        x, labels = self.dataset.sample_batch(cfg.batch_size, self.data_generator)
        labels = labels if (labels is not None and self.info.num_classes) else None
        per_rank = cfg.batch_size // world.size
        rows = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
        x, labels = self._to_device(x[rows], labels[rows] if labels is not None else None)
        first = world.rank * cfg.grad_accum
        if cfg.grad_accum == 1:
            return [(first, x, labels)]
        xs = x.chunk(cfg.grad_accum)
        ls = labels.chunk(cfg.grad_accum) if labels is not None else [None] * cfg.grad_accum
        return [(first + a, xs[a], ls[a]) for a in range(cfg.grad_accum)]

    def _to_device(self, x, labels):
        """A data batch in model space on this run's device and layout (labels only for a class-conditional run)."""
        labels = labels if (labels is not None and self.info.num_classes) else None
        x = self.scaler.encode(x).to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels.to(self.device) if labels is not None else None

    def _update(self, name: str, micro: list, autocast):
        """One optimizer update: loss and backward per micro-batch, gradients averaged over micro-batches and ranks,
        clipping, a finite check, step. Returns (loss, grad norm, metrics); loss is the global batch's mean."""
        optimizer = self.optimizers[name]
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step) * self.lr_scales[name]
        optimizer.zero_grad(set_to_none=True)
        total, metrics = None, {}
        for a, (slot, x, labels) in enumerate(micro):
            if self.sharded:  # reduce-scatter once, after the last micro-batch's backward
                fsdp.set_gradient_sync(self.method.net, a == len(micro) - 1)
            self.method.begin_step(self.step, self._calls_this_step)  # 0 once per step, over all updates
            self._calls_this_step += 1
            with self.streams.use(slot), autocast:
                out = self.method.update_loss(name, x, labels)
            out.loss.backward()  # accumulates into .grad: the sum over micro-batches, averaged just below
            total = out.loss.detach() if total is None else total + out.loss.detach()
            for k, v in out.metrics.items():
                metrics[k] = v if k not in metrics else metrics[k] + v
        if self.shards == 1:
            loss = total  # the plain single-process path, untouched: old runs resume bit for bit
        else:  # the loss rides in the gradients' last all-reduce bucket: one collective guards and logs it
            params = self.params[name]
            if self.sharded:  # sharded gradients come back averaged over ranks: average the micro-batches here
                sharded = [p.grad for p in params if p.grad is not None and fsdp.is_sharded(p.grad)]
                if len(micro) > 1 and sharded:
                    torch._foreach_mul_(sharded, 1.0 / len(micro))
                params = [p for p in params if not fsdp.is_sharded(p)]
            loss = distributed.average_gradients(params, self.world, self.shards,
                                                 extra=total.float().reshape(1)).reshape(())
            if len(micro) > 1:
                metrics = {k: v / len(micro) for k, v in metrics.items()}  # ranks' means averaged at log steps
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        clip = fsdp.clip_grad_norm if self.sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.params[name], max_norm)
        # One host sync per update: a NaN loss also makes the gradient norm NaN, so a single check guards both,
        # before the optimizer can write a non-finite value into the weights.
        if not torch.isfinite(loss.detach() + grad_norm):
            what = f"loss is {loss.item()}, gradient norm is {grad_norm.item()}"
            self._diverged(what if name == "net" else f"{name} update: {what}")
        optimizer.step()
        return loss.detach(), grad_norm.detach(), metrics

    def _metrics(self, metrics: dict) -> dict:
        """Method metrics as floats, averaged over ranks (called at log steps only, on every rank)."""
        if not self.world.active:
            return {k: float(v) for k, v in metrics.items()}
        values = {k: torch.as_tensor(v, device=self.device) for k, v in metrics.items()}
        return distributed.mean_metrics(values, self.world)

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
        # Each rank checks its own rows; all stop if any failed.
        if not distributed.all_agree(bool(report.get("ok", 1.0)), self.world, self.device):
            raise JumpflowError(f"{self.cfg.method} self-check failed before training: {report}. For a JVP "
                                f"mismatch, an op in the backbone lacks a correct forward-mode rule: try "
                                f"jvp_mode=finite_difference")

    def _diverged(self, what: str) -> None:
        kept = latest_checkpoint(self.out)
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been written yet"
        raise TrainingDiverged(f"training diverged at step {self.step + 1}: {what}; stopped without saving, {where}. "
                               f"Try a lower lr, a longer warm-up or grad_clip.")

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
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

    @torch.no_grad()
    def sample_all_ranks(self, noise: torch.Tensor, steps: int, labels=None) -> torch.Tensor:
        """`sample` with the rows of `noise` split over the ranks and the results gathered (on every rank)."""
        if not self.world.active:
            return self.sample(noise, steps, labels)
        n, rank = noise.shape[0], self.world.rank
        part = torch.tensor_split(noise, self.world.size)[rank]
        part_labels = None if labels is None else torch.tensor_split(labels, self.world.size)[rank]
        self.method.eval()
        try:
            z = self.method.sample(part.to(self.device), steps, labels=part_labels, net=self.ema.shadow)
        finally:
            self.method.train()
        z = distributed.gather_rows(z.float().contiguous(), n, self.world)
        return self.scaler.decode(z.cpu())

    def save_picture(self) -> Optional[Path]:
        """Called on every rank (each samples its share of the fixed noise); rank 0 draws the picture."""
        noise = self.picture_noise
        labels = None
        if self.info.num_classes:
            labels = torch.arange(noise.shape[0], device=self.device) % self.info.num_classes
        limit = self.method.max_sample_steps
        samples = [(k, self.sample_all_ranks(noise, k, labels))
                   for k in [k for k in self.cfg.sample_steps if limit is None or k <= limit] or [1]]
        if not self.is_main:
            return None
        panels = [("data", self.dataset.reference(noise.shape[0]))]
        for k, z in samples:
            panels.append((f"{k} step{'s' if k > 1 else ''} (NFE {self.method.nfe(k)})", z))
        return save_panels(self.out / "samples" / f"step_{self.step:07d}.png", panels,
                           title=f"{self.cfg.method} on {self.info.name}, step {self.step} (EMA)")

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Called on every rank (they hand their random streams to rank 0); rank 0 writes the checkpoint."""
        streams = distributed.gather_objects(self.streams.states, self.world)
        if not (self.is_main or self.sharded):  # sharded: every rank takes part in gathering the full tensors
            return None
        keep = self.is_main  # the other ranks only take part in the gathers
        tensors = {f"model.{k}": v for k, v in fsdp.full_state(self.method.state_dict(), keep).items()}
        tensors.update({f"ema.{k}": v for k, v in fsdp.full_state(self.ema.shadow.state_dict(), keep).items()})
        groups = {}
        gather = (lambda v: fsdp.full(v, keep)) if self.sharded else None
        for name, optimizer in self.optimizers.items():
            optim_tensors, groups[name] = optimizer_to_tensors(optimizer, optimizer_prefix(name), gather=gather)
            tensors.update(optim_tensors)
        if not self.is_main:
            return None
        tensors.update(self.scaler.tensors())
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.data_generator.get_state()
        if self.device.type == "cuda":  # this process's device only: touching the others would start them up
            tensors[f"rng.cuda.{self.device.index or 0}"] = torch.cuda.get_rng_state(self.device)
        for states in streams:  # one random stream per micro-batch slot when there are several (ShardStreams)
            for j, (cpu, cuda) in states.items():
                tensors[f"rng.shard.{j}.torch"] = cpu
                if cuda is not None:
                    tensors[f"rng.shard.{j}.cuda"] = cuda
        metadata = {"step": str(self.step), "train_seconds": f"{self.train_seconds:.3f}",
                    "rng_shards": str(self.shards), "config": json.dumps(self.cfg.to_dict()),
                    "data": json.dumps(self.info.to_dict()),
                    **{optimizer_prefix(name) + "_groups": g for name, g in groups.items()}}
        path = self.out / "checkpoints" / f"step_{self.step:07d}.safetensors"
        save_checkpoint(path, tensors, metadata)
        prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path

    def _restore(self, path: Path) -> None:
        tensors, metadata = load_checkpoint(path)
        try:
            fsdp.load_full_state(self.method, split_prefix(tensors, "model"))  # sharded where the module is
            fsdp.load_full_state(self.ema.shadow, split_prefix(tensors, "ema"))
            for name, optimizer in self.optimizers.items():
                prefix = optimizer_prefix(name)
                optimizer_from_tensors(optimizer, tensors, metadata[prefix + "_groups"], prefix,
                                       layout=lambda state, p=self.params[name]: fsdp.optimizer_state_like_params(
                                           state, p))
        except (RuntimeError, KeyError, ValueError) as e:
            raise JumpflowError(f"checkpoint {path} does not match this run's config: {e}") from e
        self.scaler = Standardizer.from_tensors(tensors)
        torch.set_rng_state(tensors["rng.torch"])
        self.data_generator.set_state(tensors["rng.data"])
        cuda_key = f"rng.cuda.{self.device.index or 0}"
        if self.device.type == "cuda" and cuda_key in tensors:
            torch.cuda.set_rng_state(tensors[cuda_key], self.device)
        saved_shards = int(metadata.get("rng_shards", "1"))  # checkpoints before grad_accum/multi-GPU: one stream
        for j in self.streams.states:
            cpu, cuda = tensors.get(f"rng.shard.{j}.torch"), tensors.get(f"rng.shard.{j}.cuda")
            if cpu is not None:
                self.streams.states[j] = (cpu, cuda if self.device.type == "cuda" else None)
        if saved_shards != self.shards and self.is_main:
            print(f"jumpflow: {path} was written with {saved_shards} micro-batch slot(s) per step (world size x "
                  f"grad_accum), this run has {self.shards}: training continues, but its random draws differ from "
                  f"an uninterrupted run's", file=sys.stderr)
        self.step = int(metadata["step"])
        self.train_seconds = float(metadata.get("train_seconds", 0.0))
