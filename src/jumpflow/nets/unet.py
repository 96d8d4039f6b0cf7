"""A small DDPM/ADM-style U-Net for images (B, C, H, W), conditioned on (t, s, label) by adaptive GroupNorm.

Everything here has forward-mode AD rules (conv, linear, GroupNorm, SiLU, nearest upsampling, softmax, matmul), so
torch.func.jvp runs through it; attention is written out explicitly instead of calling a fused kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import JumpflowError
from .embeddings import ConditionEmbedding, batch_times


def _groups(channels: int) -> int:
    """At most 32 groups, dividing the channels, with >= 4 channels per group where possible: at 2x2 resolution
    a 1-channel group would normalise over 4 numbers, a badly conditioned (high-curvature) map."""
    return math.gcd(32, max(1, channels // 4))


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in at least float32 (bfloat16 statistics under autocast are too coarse).

    A channels-last input is made contiguous first: torch's forward-mode rule for group_norm (the JVP of MeanFlow,
    TVM, sCT ...) views the tangent in a way only a contiguous tensor allows, and fails on channels-last (torch 2.13).
    The next convolution returns to channels-last by itself (its weights are), so this costs one copy per norm."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if not x.is_contiguous():
            x = x.contiguous()
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class ResBlock(nn.Module):
    """conv(SiLU(GN(x))) -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv, plus a (1x1) skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        # Affine-free: the scale/shift come from the conditioning vector.
        self.norm2 = GroupNorm(_groups(cout), cout, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # (B, Cin, H, W), (B, E) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, Cout, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual.

    Written as softmax(Q K^T / sqrt(d)) V rather than F.scaled_dot_product_attention: fused SDPA kernels (flash,
    memory-efficient) have no forward-mode AD rule, and this net must work under torch.func.jvp whatever the caller's
    backend settings. The explicit form is only used at low resolutions (<= 16x16 by default), where it is cheap.
    """

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = channels // head_channels if channels % head_channels == 0 and channels >= head_channels else 1
        self.norm = GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hgt * wid)
        q, k, v = qkv.unbind(dim=1)  # (B, heads, d, N) each
        logits = torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(c // self.heads)  # (B, heads, N, N)
        weights = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        out = torch.einsum("bhnm,bhdm->bhdn", weights.to(v.dtype), v).reshape(b, c, hgt, wid)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """net(x, t, s, cond=None, extra=None) -> shaped like x, for square images x of shape (B, C, H, W).

    Levels run at H, H/2, ..., H/2**(len(channel_mult)-1) with channels * mult channels each. attention_resolutions
    lists the side lengths that get self-attention; None means "the lowest resolution only, if it is >= 4" (so 8x8
    digits with the default (1, 2, 2) get no attention and stay cheap), () means none.

    extra_inputs = k: the net also takes `extra`, a (B, k) float tensor of scalars, each embedded by its own Fourier
    embedder and summed into the conditioning vector (ConditionEmbedding). heads = n: the output convolution makes n
    predictions from the shared trunk, concatenated along the channels: (B, n * C, H, W). The defaults (0, 1) build
    exactly the net without these options (same parameters, state-dict keys and outputs).
    """

    data_rank = 3  # build() checks len(shape) against this

    def __init__(self, shape: Sequence[int], num_classes: int = 0, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Optional[Sequence[int]] = None, dropout: float = 0.0,
                 head_channels: int = 64, frequency_dim: int = 256,
                 max_frequency: float = 20.0, extra_inputs: int = 0, heads: int = 1):
        super().__init__()
        shape = tuple(int(d) for d in shape)
        channel_mult = tuple(int(m) for m in channel_mult)
        self._validate(shape, channel_mult, channels, num_res_blocks)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise JumpflowError(f"heads must be an int >= 1, got {heads!r}")
        cin, side = shape[0], shape[1]
        lowest = side // 2 ** (len(channel_mult) - 1)
        if attention_resolutions is None:
            attention_resolutions = (lowest,) if lowest >= 4 else ()
        self.attention_resolutions: Tuple[int, ...] = tuple(int(r) for r in attention_resolutions)
        resolutions = [side // 2 ** i for i in range(len(channel_mult))]
        missing = sorted(set(self.attention_resolutions) - set(resolutions))
        if missing:  # a typo here would silently drop attention
            raise JumpflowError(f"attention_resolutions {missing} are not resolutions of this unet; "
                                f"it runs at {resolutions}")
        self.shape = shape
        self.num_classes = num_classes
        self.extra_inputs, self.heads = extra_inputs, heads
        emb_dim = 4 * channels
        self.cond = ConditionEmbedding(emb_dim, num_classes, frequency_dim, max_frequency, extra_inputs)
        self.inp = nn.Conv2d(cin, channels, 3, padding=1)

        def attn(ch: int, res: int) -> nn.Module:
            return Attention(ch, head_channels) if res in self.attention_resolutions else nn.Identity()

        # Encoder: every block's output is kept as a skip for the decoder.
        self.down = nn.ModuleList()
        skips, ch, res = [channels], channels, side
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(ch, channels * mult, emb_dim, dropout),
                                                attn(channels * mult, res)]))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = attn(ch, res)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)
        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip; upsample at the end of a level.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout),
                                              attn(channels * mult, res)]))
                ch = channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out_norm = GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, heads * cin, 3, padding=1)  # heads predictions side by side: (B, heads * C, H, W)
        # Zero output: an untrained net predicts 0.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _validate(shape: Tuple[int, ...], channel_mult: Tuple[int, ...], channels: int, num_res_blocks: int) -> None:
        if len(shape) != 3:
            raise JumpflowError(f"the unet backbone takes images of shape (C, H, W), got shape {shape}; "
                                f"use the mlp backbone for vectors (D,)")
        c, h, w = shape
        if c < 1 or h != w:
            raise JumpflowError(f"the unet backbone needs square images (C, H, H) with C >= 1, got {shape}")
        if not channel_mult or min(channel_mult) < 1 or channels < 1 or num_res_blocks < 1:
            raise JumpflowError(f"unet needs channels >= 1, num_res_blocks >= 1 and a non-empty channel_mult of "
                                f"positive ints, got channels={channels}, num_res_blocks={num_res_blocks}, "
                                f"channel_mult={channel_mult}")
        factor = 2 ** (len(channel_mult) - 1)
        if h < 8 or h % factor:
            raise JumpflowError(f"unet with channel_mult={channel_mult} halves the resolution {len(channel_mult) - 1} "
                                f"times, so H = W must be >= 8 and divisible by {factor}; got {h}x{w}")

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Optional[Tensor] = None,
                extra: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        emb = self.cond(batch_times(t, b), batch_times(s, b), cond, extra)  # (B, 4 * channels)
        h = self.inp(x)  # (B, channels, H, W)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(h, emb))
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(torch.cat([h, skips.pop().to(h.dtype)], dim=1), emb))
        return self.out(F.silu(self.out_norm(h))).to(x.dtype)  # (B, heads * C, H, W)
