"""Conditioning shared by every backbone: (t, s, label, extra scalars) -> one vector.

Backbones take two times, t (now) and s (target of the jump, s <= t). We embed t and the gap h = t - s with two
separate embedders and sum them (plus a class embedding), the (t, t - r) parameterisation of MeanFlow.
h = 0 ("instantaneous velocity") is an ordinary input: sin(0) = 0, cos(0) = 1, nothing divides by h.
A backbone built with extra_inputs = k also takes k extra scalars per sample (say a guidance scale and a guidance
interval, iMF), each with its own Fourier embedder, summed in; with k = 0 (the default) none exist.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import JumpflowError


def _is_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def batch_times(t: Tensor, batch: int) -> Tensor:
    """Accept a (B,) tensor, a (B, 1) tensor, a 0-d tensor or a (1,) tensor; return (B,)."""
    return t.reshape(-1).expand(batch)


def check_labels(cond: Tensor, num_classes: int) -> None:
    """Labels live in [0, num_classes]; num_classes is the null label. A bad label is a ValueError, not a silent
    out-of-bounds gather. Skipped under torch.compile (it reads tensor values) -- validate before compiling."""
    if _is_compiling():
        return
    if cond.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"class labels must be an integer tensor, got dtype {cond.dtype}")
    # One host sync per forward; the min/max for the message are only computed on failure.
    if bool(((cond < 0) | (cond > num_classes)).any()):
        raise ValueError(f"class labels must lie in [0, {num_classes}] ({num_classes} is the null label), "
                         f"got values in [{int(cond.min())}, {int(cond.max())}]")


class TimeEmbedding(nn.Module):
    """Scalar time in [0, 1] -> (B, dim): Fourier features [cos(w t), sin(w t)], then Linear -> SiLU -> Linear.

    The angular frequencies w are log-spaced from 1 to `max_frequency` (20 by default) rad per unit time. Why not
    the DDPM recipe (t * 1000 with periods up to 10000, i.e. w up to 1000): methods here differentiate the net in t
    (MeanFlow, sCM, ...) and d/dt sin(w t) = w cos(w t), so the fastest feature sets the size of the time tangent --
    large time-embedding frequencies are a known source of JVP training instability (sCM, Lu & Song 2024) -- and the
    finite-difference JVP fallback (step 1e-3) is only accurate while w * step << 1 (error ~ (w step)^2 / 6).
    w = 20 still turns the fastest features 0.2 rad between times 0.01 apart; w = 1 gives near-linear ones.
    Measured (BENCHMARKS.md): MeanFlow on 8 gaussians at lr 2e-3 blew up its JVP target and lost its 1-step map
    within 2000 steps in 3 of 3 runs with max_frequency 100, and kept it with 20.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_frequency: float = 20.0):
        super().__init__()
        if frequency_dim < 4 or frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even and >= 4, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.max_frequency = max_frequency
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: Tensor) -> Tensor:  # (B,) -> (B, frequency_dim)
        half = self.frequency_dim // 2
        # Built on the fly on t's device (no buffer to move, nothing stored in checkpoints).
        freqs = torch.exp(torch.linspace(0.0, math.log(self.max_frequency), half, device=t.device, dtype=t.dtype))
        angles = t[:, None] * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, dim)
        # Features in the parameters' precision (float32 / float64) even under autocast: bfloat16 has ~3 significant
        # digits, too few for angles up to 100 rad.
        return self.mlp(self.features(t.to(self.mlp[0].weight.dtype)))


class ConditionEmbedding(nn.Module):
    """(t, s, cond, extra) -> (B, dim) = emb_t(t) + emb_h(t - s) + class_emb(cond) + sum_i emb_i(extra[:, i]).

    With num_classes > 0 the class table has num_classes + 1 rows; row num_classes is the null label used for
    classifier-free-guidance dropout, and cond=None means "all null". With num_classes = 0 there is no table: cond
    must be None or all zeros (0 is then the null label, which is what label dropout produces).

    extra_inputs = k adds k embedders (TimeEmbedding, so meant for scalars of order [0, 1]) for an (B, k) `extra`
    tensor, which is then required; with k = 0 there are no such modules (parameters and state-dict keys are those
    of a net without the option) and `extra` must be None.
    """

    def __init__(self, dim: int, num_classes: int = 0, frequency_dim: int = 256, max_frequency: float = 20.0,
                 extra_inputs: int = 0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if isinstance(extra_inputs, bool) or not isinstance(extra_inputs, int) or extra_inputs < 0:
            raise JumpflowError(f"extra_inputs must be an int >= 0, got {extra_inputs!r}")
        self.num_classes = num_classes
        self.extra_inputs = extra_inputs
        self.time = TimeEmbedding(dim, frequency_dim, max_frequency)
        self.gap = TimeEmbedding(dim, frequency_dim, max_frequency)
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        # Created last and only when asked for, so nets without extra inputs draw the same initial parameters.
        if extra_inputs:
            self.extra = nn.ModuleList([TimeEmbedding(dim, frequency_dim, max_frequency)
                                        for _ in range(extra_inputs)])

    def check_extra(self, extra: Optional[Tensor], batch: int) -> Optional[Tensor]:
        """None when extra_inputs = 0; else `extra` as a (batch, extra_inputs) tensor (a (1, k) row broadcasts)."""
        k = self.extra_inputs
        if k == 0:
            if extra is not None:
                raise JumpflowError("this backbone was built with extra_inputs=0 and takes no extra inputs; build it "
                                    "with extra_inputs=k to condition on k extra scalars")
            return None
        if extra is None:
            raise JumpflowError(f"this backbone was built with extra_inputs={k}: pass extra, a float tensor of shape "
                                f"(B, {k})")
        if extra.dim() != 2 or extra.shape[1] != k or extra.shape[0] not in (1, batch):
            raise JumpflowError(f"extra must have shape ({batch}, {k}) (this backbone has extra_inputs={k}), "
                                f"got {tuple(extra.shape)}")
        if not extra.is_floating_point():
            raise JumpflowError(f"extra must be a float tensor, got dtype {extra.dtype}")
        return extra.expand(batch, k)

    def forward(self, t: Tensor, s: Tensor, cond: Optional[Tensor] = None,
                extra: Optional[Tensor] = None) -> Tensor:  # (B,), (B,), (B,), (B, k) -> (B, D)
        extra = self.check_extra(extra, t.shape[0])
        emb = self.time(t) + self.gap(t - s)
        if extra is not None:
            for i, embed in enumerate(self.extra):
                emb = emb + embed(extra[:, i])
        if cond is not None:
            check_labels(cond, self.num_classes)
        if self.label is None:
            return emb
        if cond is None:
            cond = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        return emb + self.label(cond.long().reshape(-1).expand(t.shape[0])).to(emb.dtype)
