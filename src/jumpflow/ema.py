"""Exponential moving average of the student's weights: what sampling and evaluation use.

Raw weights' 1-step quality swings widely between checkpoints at a constant learning rate (DESIGN.md), so every
picture, metric and exported model comes from the EMA copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        # Warm-up (1 + n) / (10 + n): early EMA follows the fast-moving weights instead of the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.shadow.parameters(), net.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), net.buffers()):
            ema_b.copy_(b)
