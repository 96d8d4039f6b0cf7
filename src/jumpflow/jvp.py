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
            out = fn(*primals)
            with torch.no_grad():
                plus = fn(*(p + step * d for p, d in zip(primals, tangents)))
                minus = fn(*(p - step * d for p, d in zip(primals, tangents)))
            return out, (plus - minus) / (2 * step)
    raise JumpflowError(f"unknown jvp mode {mode!r}; valid: {', '.join(JVP_MODES)}")


def jvp_self_check(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor],
                   step: float = 1e-3, tolerance: float = 1e-2) -> dict:
    """Compare exact forward-mode AD with a finite difference on the current model and inputs.

    Returns {"relative_error", "norm" (of the exact JVP: 0 means the check saw nothing), "ok"}; the relative error
    is ||exact - fd|| / (||exact|| + 1e-8). A failure points at an op whose forward-mode rule is wrong or missing
    (a custom kernel, a fused attention path).
    """
    with torch.no_grad():
        _, exact = total_derivative(fn, primals, tangents, mode="exact")
        _, approx = total_derivative(fn, primals, tangents, mode="finite_difference", step=step)
    norm = exact.norm().item()
    rel = ((exact - approx).norm() / (norm + 1e-8)).item()
    return {"relative_error": rel, "norm": norm, "ok": rel <= tolerance}
