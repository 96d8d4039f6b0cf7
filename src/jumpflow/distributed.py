"""Data-parallel training through torch.distributed, without a DistributedDataParallel wrapper.

`torch.func.jvp` cannot run through DDP (see `jvp.refuse_ddp`), so every rank holds the same plain model, computes
its loss on its own shard of the global batch, and the Trainer averages gradients after backward with one all-reduce
per bucket of flattened gradients (`average_gradients`). That works for every method, JVP ones and methods with
several optimizers alike. Launch: `torchrun --nproc_per_node N -m jumpflow train ...` (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `python -m jumpflow train` is a world of one and makes no
collective call at all.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import JumpflowError

BUCKET_ELEMENTS = 2**24  # 64 MB of fp32 per all-reduce: few calls, bounded extra memory


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw is None else int(raw)
    except ValueError as e:
        raise JumpflowError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from e


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints and writes."""
    return _env_int("RANK", 0) == 0


def launch_device(requested: str = "auto") -> str:
    """The device a process of a multi-GPU torchrun launch should use (cuda:LOCAL_RANK), else `requested`."""
    if requested == "auto" and _env_int("WORLD_SIZE", 1) > 1 and torch.cuda.is_available():
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return requested


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU) and return this process's place.

    Without torchrun's variables (or WORLD_SIZE=1) this is a world of one. Idempotent: a second Trainer in the same
    process reuses the group."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise JumpflowError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise JumpflowError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible; "
                                f"use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
        atexit.register(_shutdown)
    elif dist.get_world_size() != size:
        raise JumpflowError(f"a process group of size {dist.get_world_size()} already exists; WORLD_SIZE says {size}")
    return World(rank, size, local_rank)


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device, world: World) -> torch.device:
    """One CUDA device per local rank; CPU stays CPU."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def _buckets(tensors: Sequence[Tensor]) -> List[List[int]]:
    """Indices of `tensors` grouped into buckets of at most BUCKET_ELEMENTS (one tensor may exceed it alone) and
    one dtype each."""
    buckets, current, count, dtype = [], [], 0, None
    for i, t in enumerate(tensors):
        if current and (count + t.numel() > BUCKET_ELEMENTS or t.dtype != dtype):
            buckets.append(current)
            current, count = [], 0
        current.append(i)
        count += t.numel()
        dtype = t.dtype
    if current:
        buckets.append(current)
    return buckets


def average_gradients(params: Sequence[torch.nn.Parameter], world: World, shards: int,
                      extra: Optional[Tensor] = None) -> Optional[Tensor]:
    """Replace each gradient by sum over ranks / `shards` (gradients of `shards` equally sized micro-batch losses
    summed over ranks and accumulation steps make the gradient of the global mean loss). `extra` (a 1-D tensor: the
    summed loss) rides along in the last bucket, so the loss and the NaN guard cost no extra call; it comes back
    reduced the same way. A parameter without a gradient on this rank sends zeros and keeps no gradient."""
    if not world.active:  # gradient accumulation alone: scale what is there
        tensors = [p.grad for p in params if p.grad is not None] + ([extra] if extra is not None else [])
        if shards != 1 and tensors:
            torch._foreach_mul_(tensors, 1.0 / shards)
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    missing = [p.grad is None for p in params]
    tensors = grads + ([extra] if extra is not None else [])
    for bucket in _buckets(tensors):
        members = [tensors[i] for i in bucket]
        flat = torch.cat([t.reshape(-1) for t in members])
        dist.all_reduce(flat)
        flat.mul_(1.0 / shards)
        offset = 0
        for t in members:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
    for p, g, none in zip(params, grads, missing):
        if not none:
            p.grad = g
    return extra


def mean_metrics(values: Dict[str, Tensor], world: World) -> Dict[str, float]:
    """Average scalar metrics over ranks (one call for all of them); every rank gets the same numbers."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).detach().reshape(()).float()
                           for k in keys])
    if world.active:
        dist.all_reduce(stacked)
        stacked /= world.size
    return dict(zip(keys, stacked.tolist()))


def all_agree(flag: bool, world: World, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (a check that failed anywhere stops everyone)."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_float(value: float, world: World, device: torch.device) -> float:
    """Rank 0's value on every rank (the wall clock of a time budget: ranks must stop at the same step)."""
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all ranks start from one model whatever built it."""
    if not world.active:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def split_sizes(n: int, world: World) -> List[int]:
    """How `torch.tensor_split(x, world.size)` splits n rows."""
    return [len(c) for c in torch.tensor_split(torch.arange(n), world.size)]


def gather_rows(x: Tensor, n: int, world: World) -> Tensor:
    """Concatenate every rank's rows (rank order); rank r holds split_sizes(n)[r] rows of a tensor of n rows."""
    if not world.active:
        return x
    sizes = split_sizes(n, world)
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def gather_objects(obj, world: World) -> list:
    """Every rank's `obj` on every rank, in rank order (small things: RNG states at checkpoint time)."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


class ShardStreams:
    """One random stream per micro-batch slot of the global batch, so the randomness a method draws inside its loss
    (times, noise) depends only on the number of slots S = world size x grad_accum, never on which process holds a
    slot: a 2-process run equals a 1-process run with grad_accum=2 step for step, and a checkpoint resumes exactly
    under any layout with the same S. With S = 1 there is one slot, torch's own global generator, as before.

    Slot j's CPU (and CUDA) generator starts from its own seed; `use(j)` swaps it in for one loss computation."""

    def __init__(self, seed: int, slots: Sequence[int], total: int, device: torch.device):
        self.total, self.device = total, device
        self.cuda = device.type == "cuda"
        self.states: Dict[int, tuple] = {}
        if total == 1:
            return
        outside = self._get()
        for j in slots:
            slot_seed = (seed + (j + 1) * 0x9E3779B97F4A7C15) % 2**63  # far from seed, seed + 1 (data, pictures)
            torch.manual_seed(slot_seed)  # seeds CUDA too
            self.states[j] = self._get()
        self._set(outside)

    def _get(self) -> tuple:
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if self.cuda and state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def use(self, j: int):
        return _Swap(self, j)


class _Swap:
    def __init__(self, streams: ShardStreams, j: int):
        self.streams, self.j = streams, j

    def __enter__(self):
        if self.streams.total > 1:
            self.outside = self.streams._get()
            self.streams._set(self.streams.states[self.j])

    def __exit__(self, *exc):
        if self.streams.total > 1:
            self.streams.states[self.j] = self.streams._get()
            self.streams._set(self.outside)
        return False
