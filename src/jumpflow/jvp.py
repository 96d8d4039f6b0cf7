"""The one way every JVP-based method (MeanFlow, iMF, sCM, TVM, ...) computes a total derivative.

For a function f(z, t, s) and tangents (dz, dt, ds) we need f and the directional derivative
df = J_f . (dz, dt, ds); MeanFlow uses the tangent (v, 1, 0) to get d/dt u(z_t, r, t) (METHODS.md A2).

Modes:
- "exact": forward-mode AD through `torch.func.jvp` -- one dual forward, roughly the cost of one extra forward.
  Fused attention kernels (flash / memory-efficient SDPA) have no forward-mode rule, so the call runs with the math
  SDPA backend forced. DistributedDataParallel cannot be traced by torch.func: pass the unwrapped module and
  all-reduce gradients yourself (the trainer does); a DDP module here is refused with that message.
- "finite_difference": a central difference (f(p + h tan) - f(p - h tan)) / 2h, for ops lacking forward-AD rules.
  Costs two extra forwards and has O(h^2) truncation plus O(eps_machine / h) rounding error.

Both run with autocast disabled: JVPs are assembled in float32 (METHODS.md Part C.3).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor, nn

from .errors import JumpflowError

JVP_MODES = ("exact", "finite_difference")


def refuse_ddp(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.parallel.DistributedDataParallel):
            raise JumpflowError(
                "torch.func.jvp cannot run through DistributedDataParallel (gradients would silently desync): "
                "call the JVP on model.module and all-reduce the gradients after backward")


@contextlib.contextmanager
def _math_attention():
    """Force the math SDPA backend: it is the only one with forward-mode AD."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch: nothing fused to avoid
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _autocast_off(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def total_derivative(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
                     mode: str = "exact", step: float = 1e-3) -> Tuple[Tensor, Tensor]:
    """Return (fn(*primals), J_fn(primals) . tangents).

    Gradients flow into the parameters through the first output only in "exact" mode (forward-mode AD keeps the
    primal graph); callers that want a stop-gradient target detach the second output.
    """
    primals = tuple(primals)
    tangents = tuple(t.to(p.dtype) for p, t in zip(primals, tangents))
    device_type = primals[0].device.type
    with _autocast_off(device_type):
        if mode == "exact":
            with _math_attention():
                return torch.func.jvp(fn, primals, tangents)
        if mode == "finite_difference":
            same = _same_random_draws(fn, primals)  # one dropout mask for all three: else the difference is noise
            out = same(*primals)
            with torch.no_grad():
                plus = same(*(p + step * d for p, d in zip(primals, tangents)))
                minus = same(*(p - step * d for p, d in zip(primals, tangents)))
            return out, (plus - minus) / (2 * step)
    raise JumpflowError(f"unknown jvp mode {mode!r}; valid: {', '.join(JVP_MODES)}")


def _same_random_draws(fn: Callable[..., Tensor], primals: Sequence[Tensor]) -> Callable[..., Tensor]:
    """`fn` that starts every call from the RNG state of now (CPU and the primals' CUDA devices), so random layers
    (dropout) draw the same values each time; afterwards the RNG has advanced as after one call, as in exact mode."""
    devices = sorted({p.device.index or 0 for p in primals if p.is_cuda})
    cpu, cuda = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

    def call(*args):
        torch.set_rng_state(cpu)
        for d, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, d)
        return fn(*args)

    return call


def jvp_self_check(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
                   step: float = 1e-3, tolerance: float = 1e-2) -> dict:
    """Compare exact forward-mode AD with a finite difference on the current model and inputs.

    Returns {"relative_error", "norm" (of the exact JVP: 0 means the check saw nothing), "ok"}; the relative error
    is ||exact - fd|| / (||exact|| + 1e-8). A failure points at an op whose forward-mode rule is wrong or missing
    (a custom kernel, a fused attention path).

    The difference passes too when it is within the finite difference's own rounding, 10 eps ||f|| / step: a JVP
    that is small beside the output (TVM's d/ds of a fresh network that barely reads s: 0.02 against outputs of
    norm ~1) cannot be checked more finely in float32, and a wrong rule errs by the JVP's own size, not by that.
    """
    with torch.no_grad():
        out, exact = total_derivative(fn, primals, tangents, mode="exact")
        _, approx = total_derivative(fn, primals, tangents, mode="finite_difference", step=step)
    norm = exact.norm().item()
    error = (exact - approx).norm().item()
    rounding = 10 * torch.finfo(out.dtype).eps * out.norm().item() / step
    rel = error / (norm + 1e-8)
    return {"relative_error": rel, "norm": norm, "ok": rel <= tolerance or error <= rounding}


def nonvacuous_copy(net: nn.Module) -> nn.Module:
    """A trainable copy of `net` for self-checks, its all-zero parameters re-drawn small and random, in eval mode.

    Backbones start with a zero output layer, which makes every derivative 0 and any JVP check pass vacuously. Eval
    mode: dropout would give the exact JVP and its finite-difference reference different masks."""
    probe = copy.deepcopy(net).requires_grad_(True).eval()
    with torch.no_grad():
        for p in probe.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return probe


JVP_BACKWARD_TOLERANCE = 1e-2  # float32 central differences along a unit weight direction are good to ~1e-4


def jvp_backward_error(net: nn.Module, fn: Callable[..., Tensor], primals: Sequence[Tensor],
                       tangents: Sequence[Tensor], step: float = 1e-3) -> float:
    """Relative error of the autograd gradient of phi = <JVP, r> (random r) against a central difference of phi
    along that gradient's own unit direction: the error a descent step would see. For methods that back-propagate
    through a JVP (TVM, Modular MeanFlow): a wrong backward rule of some op's forward-mode derivative would make
    their gradients silently wrong. (Random directions are more sensitive but flag errors that a descent step never
    sees: torch 2.13's F.layer_norm is off by up to ~30% along random directions of the MLP's weights, and by ~1e-4
    along the gradient.)
    """
    params = [p for p in net.parameters() if p.requires_grad]
    _, jvp = total_derivative(fn, primals, tangents)
    probe = torch.randn_like(jvp)
    grads = torch.autograd.grad((jvp * probe).sum(), params, allow_unused=True)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)).item()
    if norm == 0.0:
        return 0.0
    directions = [g / norm if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

    def projected(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(sign * step * d)
            value = (total_derivative(fn, primals, tangents)[1] * probe).double().sum().item()
            for p, d in zip(params, directions):
                p.sub_(sign * step * d)
        return value

    numeric = (projected(1.0) - projected(-1.0)) / (2 * step)  # ~ |grad| if the gradient is right
    return abs(norm - numeric) / norm


def jvp_report(probe: nn.Module, fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
               backward: bool = False) -> dict:
    """What a JVP method's self_check returns: the forward-mode check of `fn` (a function of `probe`, a
    `nonvacuous_copy`) and, with `backward`, the check of the gradient through the JVP; "ok" is 1.0 when all pass."""
    report = jvp_self_check(fn, primals, tangents)
    out = {"jvp_relative_error": report["relative_error"], "jvp_norm": report["norm"], "ok": float(report["ok"])}
    if backward:
        out["jvp_backward_relative_error"] = jvp_backward_error(probe, fn, primals, tangents)
        out["ok"] = float(report["ok"] and out["jvp_backward_relative_error"] <= JVP_BACKWARD_TOLERANCE)
    return out
