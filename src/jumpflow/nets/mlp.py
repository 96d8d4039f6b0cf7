"""Residual MLP for vector data (B, D): the backbone for 2-D toys and other low-dimensional data."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import JumpflowError
from .embeddings import ConditionEmbedding, batch_times


LAYER_NORM_EPS = 1e-5


def _layer_norm(x: Tensor) -> Tensor:
    # Normalise in at least float32 (bfloat16 statistics are coarse); float64 stays float64 for gradient checks.
    # Written out rather than F.layer_norm: in torch 2.13 the backward of F.layer_norm's forward-mode derivative is
    # wrong (gradcheck of torch.func.jvp(F.layer_norm) fails even in float64), which corrupts the gradients of
    # methods that backpropagate through a JVP (TVM). Plain mean/variance arithmetic differentiates correctly.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + LAYER_NORM_EPS)


class ResidualBlock(nn.Module):
    """x + Linear(SiLU(Linear(FiLM(LayerNorm(x), emb)))): the conditioning vector sets a per-feature scale/shift."""

    def __init__(self, width: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        # Not zero-initialised: with the output layer already at zero, a zero FiLM would also hide t and s from the
        # output for the first optimiser step.
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # (B, W), (B, E) -> (B, W)
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=-1)
        h = _layer_norm(x) * (1 + scale) + shift
        h = self.fc2(self.dropout(F.silu(self.fc1(h))))
        return x + h


class MLP(nn.Module):
    """net(x, t, s, cond=None, extra=None) -> shaped like x, for x of shape (B, D).

    Defaults (width 256, 4 blocks, ~1.25M parameters) fit 2-D toys in a minute or two on a CPU.
    extra_inputs = k: the net also takes `extra`, a (B, k) float tensor of scalars, each embedded by its own Fourier
    embedder and summed into the conditioning vector (ConditionEmbedding). heads = n: the output layer makes n
    predictions from the shared trunk, concatenated along dim 1, so the output is (B, n * D). The defaults (0, 1)
    build exactly the net without these options (same parameters, state-dict keys and outputs).
    """

    data_rank = 1  # build() checks len(shape) against this

    def __init__(self, shape: Sequence[int], num_classes: int = 0, width: int = 256, depth: int = 4,
                 emb_dim: Optional[int] = None, frequency_dim: int = 128, dropout: float = 0.0,
                 max_frequency: float = 20.0, extra_inputs: int = 0, heads: int = 1):
        super().__init__()
        shape = tuple(int(d) for d in shape)
        if len(shape) != 1 or shape[0] < 1:
            raise JumpflowError(f"the mlp backbone takes vector data of shape (D,), got shape {shape}; "
                                f"use the unet backbone for images (C, H, W)")
        if width < 1 or depth < 0:
            raise JumpflowError(f"mlp needs width >= 1 and depth >= 0, got width={width}, depth={depth}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise JumpflowError(f"heads must be an int >= 1, got {heads!r}")
        self.shape = shape
        self.num_classes = num_classes
        self.extra_inputs, self.heads = extra_inputs, heads
        emb_dim = emb_dim or width
        self.cond = ConditionEmbedding(emb_dim, num_classes, frequency_dim, max_frequency, extra_inputs)
        self.inp = nn.Linear(shape[0], width)
        self.blocks = nn.ModuleList([ResidualBlock(width, emb_dim, dropout) for _ in range(depth)])
        self.out = nn.Linear(width, heads * shape[0])  # heads predictions side by side: (B, heads * D)
        # Zero output: an untrained net predicts 0 (a safe start for velocity/jump targets).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Optional[Tensor] = None,
                extra: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        emb = self.cond(batch_times(t, b), batch_times(s, b), cond, extra)  # (B, E)
        h = self.inp(x)  # (B, W)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(_layer_norm(h))).to(x.dtype)  # (B, heads * D)
