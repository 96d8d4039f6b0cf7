"""Fully sharded data parallelism (`parallel=fsdp`): the student and its EMA split over the ranks, for backbones whose
weights, gradients and AdamW state do not fit one GPU.

torch's FSDP2 (`fully_shard`) turns each parameter into a DTensor sharded along dim 0; a forward all-gathers one unit
(a block) at a time and frees it after, backward reduce-scatters its gradients (averaged over ranks). Forward-mode AD
(`torch.func.jvp`, the MeanFlow family) runs through it, unlike through DDP's wrapper.

The units are the leaves of the backbone's `nn.ModuleList`s (the MLP's residual blocks, the UNet's res/attention
blocks, the DiT's transformer blocks) plus the root for what is left (embeddings, heads): backbones need not know
about sharding. Checkpoints hold full (gathered) tensors under the same names as an unsharded run, so a sharded run's
checkpoint samples, exports and resumes anywhere, and a replicated run's resumes sharded.

Every helper that gathers is a collective: all ranks call it, in the same order.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

import torch
from torch import Tensor, nn

from .errors import JumpflowError


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor_type())


def _units(module: nn.Module) -> List[nn.Module]:
    """The leaves of every ModuleList inside `module` (a ModuleList of ModuleLists is looked into)."""
    units = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            for item in child:
                units.extend(_units(nn.ModuleList([item])) if isinstance(item, nn.ModuleList) else [item])
        else:
            units.extend(_units(child))
    return units


def shard(module: nn.Module, device: torch.device, world_size: int, trains: bool = True) -> nn.Module:
    """Shard `module` in place over all ranks: each ModuleList leaf is one unit, the root holds the rest.

    A module that never runs backward (the EMA, a target net) must reshard its root after every forward too: FSDP
    keeps a root's gathered weights until backward by default, and they would then stay whole and no longer line up
    with the student's shards that the EMA update pairs them with."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - every torch >= 2.6 has it
        raise JumpflowError(f"parallel=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {e}") from e
    mesh = init_device_mesh(device.type, (world_size,))
    for unit in _units(module):
        if any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=None if trains else True)
    return module


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients on this backward (the last micro-batch) or only accumulate them locally."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)


def full(t: Tensor, keep: bool = True) -> Tensor:
    """The whole tensor (gathered from every rank when sharded), on the CPU. A collective for sharded tensors.
    keep=False (the ranks that do not write) takes part in the gather and drops the result at once, so that only
    the writing rank ever holds a whole checkpoint in host memory."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu() if keep else t.new_empty(0, device="cpu")


def full_state(state: Dict[str, Tensor], keep: bool = True) -> Dict[str, Tensor]:
    """A state dict with every sharded entry gathered (a collective: iterate the same dict on every rank)."""
    return {k: full(v, keep) if is_sharded(v) else v for k, v in state.items()}


def like(full_tensor: Tensor, target) -> Tensor:
    """`full_tensor` laid out like `target`: this rank's shard when `target` is sharded (no communication: every rank
    has read the whole tensor from the checkpoint), else unchanged."""
    if not is_sharded(target):
        return full_tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full_tensor.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)


def load_full_state(module: nn.Module, tensors: Dict[str, Tensor]) -> None:
    """`module.load_state_dict` from full tensors, sharding them where the module's entries are sharded."""
    current = module.state_dict()
    module.load_state_dict({k: like(v, current[k]) if k in current else v for k, v in tensors.items()})


def optimizer_state_like_params(state: Dict[int, Dict[str, Tensor]], params: Sequence[Tensor]) -> Dict:
    """Full optimizer state (by parameter index) laid out like the parameters: per-parameter moments of a sharded
    parameter become its shard; scalars (AdamW's step) stay as they are."""
    out = {}
    for index, values in state.items():
        p = params[index]
        out[index] = {k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v
                      for k, v in values.items()}
    return out


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """`clip_grad_norm_` over a mix of sharded and plain parameters (an auxiliary network stays plain): the norm of
    the sharded gradients is reduced over ranks, combined with the plain ones', and both are scaled alike. Returns the
    global norm as a plain tensor on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    norms = []
    if sharded:
        n = torch.nn.utils.get_total_norm(sharded)
        norms.append(n.full_tensor() if is_sharded(n) else n)
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain).to(norms[0].device if norms else plain[0].device))
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if plain:
            torch._foreach_mul_(plain, coef.to(plain[0].device))
        if sharded:  # a DTensor times a plain tensor is refused; the float costs one sync, as the NaN check does
            torch._foreach_mul_(sharded, float(coef))
    return total
