"""Checkpoints: one safetensors file per step, written atomically, loadable without executing pickle code.

Layout of `runs/NAME/checkpoints/step_N.safetensors`:
  tensors   model.*  (the method module: student + auxiliary nets)   ema.*  (EMA copy of the student)
            optim.<param index>.<state key>                          rng.torch, rng.data, rng.cuda.<i>
            scaler.mean / scaler.std (vector data standardisation, when used)
            rng.shard.<j>.torch / .cuda (one random stream per micro-batch slot j of the global batch, when a step
            has several: world size x grad_accum > 1; rank 0 gathers them from all ranks)
  metadata  format, step, config (JSON of TrainConfig), data (shape, kind, num_classes, name),
            optim_groups (JSON of the optimizer's param_groups), rng_shards (slots per step; absent = 1)
A checkpoint alone is enough to sample: it carries its config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import JumpflowError

FORMAT = "jumpflow-checkpoint-1"
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


def save_checkpoint(path: Path, tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, **metadata})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise JumpflowError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:  # one read: tensors and metadata together, no pickle
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise JumpflowError(f"checkpoint {path} is corrupt or not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise JumpflowError(f"{path} is a safetensors file but not a jumpflow checkpoint (format: "
                            f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, metadata


def list_checkpoints(run_dir: Path) -> Dict[int, Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[max(found)] if found else None


def resolve_checkpoint(path_or_dir) -> Path:
    """A checkpoint file, or a run directory (its latest checkpoint)."""
    p = Path(path_or_dir)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise JumpflowError(f"run directory {p} holds no checkpoint (expected {p}/checkpoints/step_N.safetensors)")
        return latest
    if not p.exists():
        raise JumpflowError(f"checkpoint {p} does not exist")
    return p


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = list_checkpoints(run_dir)
    for step in sorted(found)[:-keep]:
        found[step].unlink()


def split_prefix(tensors: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim",
                         gather: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Dict[str, Tensor], str]:
    """Flat tensors of the optimizer's state, keyed by parameter index; `gather` makes a sharded value whole (a
    collective under FSDP, called for every tensor in the same order on every rank)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}.{index}.{key}"] = gather(value) if gather is not None else value
    return tensors, json.dumps(state["param_groups"])


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: Dict[str, Tensor], groups_json: str,
                           prefix: str = "optim", layout: Optional[Callable[[dict], dict]] = None) -> None:
    """Inverse of optimizer_to_tensors; `layout` maps the full per-index state to the parameters' layout (shards)."""
    state: Dict[int, Dict[str, Tensor]] = {}
    for name, value in split_prefix(tensors, prefix).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    if layout is not None:
        state = layout(state)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})
