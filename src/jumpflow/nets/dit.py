"""Diffusion Transformer (DiT) for images (B, C, H, W), conditioned on (t, s, label, extra scalars).

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748): patchify, add a 2-D sin-cos
position embedding, run transformer blocks with adaLN-Zero (each block's LayerNorm shift/scale and residual gates
regressed from the conditioning vector, the regressing layers zero-initialised so every block starts as the
identity), then a final adaLN layer and a linear "unpatchify". MeanFlow (Geng et al. 2025) trains this net with two
times; here the conditioning vector is jumpflow's ConditionEmbedding, emb(t) + emb(t - s) + emb(label) + emb(extra).

Optional in-context conditioning (Improved MeanFlow, Geng et al. 2025, arXiv 2512.02012): each condition (t, t - s,
the label, each extra scalar such as iMF's guidance scale and interval) is also fed as `in_context_tokens` tokens
prepended to the patch sequence and dropped before the output; with adaln=False they are the only conditioning.

Attention calls F.scaled_dot_product_attention, so it gets the fused kernels where they apply. Fused kernels have no
forward-mode AD rule: jumpflow.jvp forces the math backend during JVPs, and a JVP taken any other way (a bare
torch.func.jvp) falls back to the math backend here instead of failing.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import JumpflowError
from .embeddings import ConditionEmbedding, TimeEmbedding, batch_times, check_labels

# name -> (hidden_size, depth, attention_heads). S/B/L/XL: DiT Table 1; "tiny" is for tests and CPU smoke runs;
# "cpu" (1.2M parameters at patch 2 on 8x8 digits, the digits UNet's size) is the preset of images up to 16x16.
SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (32, 2, 2),
    "cpu": (128, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DEFAULT_PATCH = 2  # the patch size of every model iMF/MeanFlow report best results with (B/2 ... XL/2)
POSITION_EMBEDDINGS = ("sincos", "learned")
LAYER_NORM_EPS = 1e-6  # DiT's


def layer_norm(x: Tensor) -> Tensor:
    """Affine-free LayerNorm over the last dim, in at least float32, written out: in torch 2.13 the backward of
    F.layer_norm's forward-mode derivative is wrong, which corrupts methods that backpropagate through a JVP (TVM);
    see nets/mlp.py."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + LAYER_NORM_EPS)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:  # (B, N, D), (B, D), (B, D)
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_position_embedding(dim: int, rows: int, cols: int) -> Tensor:
    """(rows * cols, dim) fixed 2-D sin-cos embedding (Transformer's 1-D one per axis, MAE/DiT): half of the features
    encode the row, half the column, each as [sin(p w), cos(p w)] with w = 10000^(-i / (dim / 4))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(positions: Tensor) -> Tensor:  # (N,) -> (N, dim / 2)
        angles = positions[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    return torch.cat([axis(r.reshape(-1)), axis(c.reshape(-1))], dim=1).float()


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA with whatever kernel torch picks; if that kernel has no forward-mode AD rule (we are inside a JVP that
    did not come through jumpflow.jvp), redo it with the math backend, which has one."""
    try:
        return F.scaled_dot_product_attention(q, k, v)
    except NotImplementedError as error:
        if "forward AD" not in str(error):
            raise
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, d))  # SDPA on (B, heads, N, d) each


class Modulation(nn.Module):
    """The per-sample (shift, scale, gate, ...) vectors of a block: regressed from the conditioning vector (adaLN,
    zero-initialised: adaLN-Zero), or, without adaLN, learned constants (shifts/scales, i.e. an affine LayerNorm)
    with gates fixed at 1 (a plain pre-norm transformer)."""

    def __init__(self, dim: int, count: int, adaln: bool, gated: bool):
        super().__init__()
        self.count, self.gated = count, gated
        if adaln:
            self.linear = nn.Linear(dim, count * dim)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        else:
            self.linear = None
            self.affine = nn.Parameter(torch.zeros(count * 2 // 3 if gated else count, dim))

    def forward(self, c: Tensor) -> List[Tensor]:  # (B, D) -> count tensors (B, D)
        if self.linear is not None:
            return list(self.linear(F.silu(c)).chunk(self.count, dim=-1))
        affine = list(self.affine.to(c.dtype)[:, None].expand(-1, c.shape[0], -1).unbind(0))
        if not self.gated:
            return affine
        ones = torch.ones_like(c)
        return [affine[0], affine[1], ones, affine[2], affine[3], ones]  # gates 1


class DiTBlock(nn.Module):
    """x + g1 * Attn(modulate(LN(x))) then x + g2 * MLP(modulate(LN(x))): DiT's adaLN-Zero block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, adaln: bool):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = Modulation(dim, 6, adaln, gated=True)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # (B, N, D), (B, D) -> (B, N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1[:, None] * self.attn(modulate(layer_norm(x), shift1, scale1).to(x.dtype))
        return x + gate2[:, None] * self.mlp(modulate(layer_norm(x), shift2, scale2).to(x.dtype))


class DiT(nn.Module):
    """net(x, t, s, cond=None, extra=None) -> shaped like x, for images x of shape (B, C, H, W), H and W divisible
    by the patch size.

    size: "tiny", "cpu", "S", "B", "L" or "XL" (DiT's widths/depths/heads), optionally with the patch size, "XL/2";
    hidden_size, depth, attention_heads and patch_size override the named size. The default, "S/2", is DiT's smallest
    model (~33M parameters): it wants a GPU; "tiny" runs anywhere. position_embedding: "sincos" (fixed, DiT) or
    "learned" (started from the sin-cos table). in_context_tokens = k > 0: every condition is also given as k tokens
    prepended to the sequence (iMF); adaln=False then leaves them as the only conditioning.
    extra_inputs and heads are the generic backbone options (nets/__init__.py): k extra scalars summed into the
    conditioning vector, n predictions concatenated along the channels, (B, n * C, H, W).
    """

    data_rank = 3  # build() checks len(shape) against this

    def __init__(self, shape: Sequence[int], num_classes: int = 0, size: str = "S/2",
                 hidden_size: Optional[int] = None, depth: Optional[int] = None,
                 attention_heads: Optional[int] = None, patch_size: Optional[int] = None, mlp_ratio: float = 4.0,
                 position_embedding: str = "sincos", in_context_tokens: int = 0, adaln: bool = True,
                 frequency_dim: int = 256, max_frequency: float = 20.0, extra_inputs: int = 0, heads: int = 1):
        super().__init__()
        shape = tuple(int(d) for d in shape)
        dim, depth, num_heads, patch = self._resolve_size(size, hidden_size, depth, attention_heads, patch_size)
        self._validate(shape, dim, num_heads, patch, mlp_ratio, position_embedding, in_context_tokens, adaln, heads)
        cin, height, width = shape
        self.shape, self.num_classes = shape, num_classes
        self.extra_inputs, self.heads = extra_inputs, heads
        self.patch_size, self.hidden_size, self.in_context_tokens = patch, dim, in_context_tokens
        self.grid = (height // patch, width // patch)
        self.cond = ConditionEmbedding(dim, num_classes, frequency_dim, max_frequency, extra_inputs)
        self.patchify = nn.Conv2d(cin, dim, patch, stride=patch)  # (B, C, H, W) -> (B, D, H/p, W/p)
        table = sincos_position_embedding(dim, *self.grid)[None]  # (1, N, D)
        if position_embedding == "learned":
            self.position = nn.Parameter(table)
        else:  # fixed: rebuilt at construction, so not stored in checkpoints
            self.register_buffer("position", table, persistent=False)
        if in_context_tokens:
            conditions = 2 + (num_classes > 0) + extra_inputs  # t, t - s, label, extras
            self.context_position = nn.Parameter(torch.zeros(conditions, in_context_tokens, dim))
        self.blocks = nn.ModuleList([DiTBlock(dim, num_heads, mlp_ratio, adaln) for _ in range(depth)])
        self.final_modulation = Modulation(dim, 2, adaln, gated=False)
        self.out = nn.Linear(dim, patch * patch * heads * cin)  # heads predictions per patch
        self._init_weights()

    @staticmethod
    def _resolve_size(size: str, hidden_size, depth, attention_heads, patch_size) -> Tuple[int, int, int, int]:
        match = re.fullmatch(r"([A-Za-z]+)(?:/(\d+))?", str(size))
        if match is None or match.group(1) not in SIZES:
            raise JumpflowError(f"unknown dit size {size!r}; valid: {', '.join(SIZES)}, optionally with a patch "
                                f"size as in 'XL/2'")
        named_patch = int(match.group(2)) if match.group(2) else None
        if named_patch is not None and patch_size is not None and named_patch != patch_size:
            raise JumpflowError(f"dit size {size!r} names patch size {named_patch} but patch_size={patch_size}; "
                                f"give it once")
        dim, layers, num_heads = SIZES[match.group(1)]
        patch = patch_size or named_patch or DEFAULT_PATCH
        resolved = (hidden_size or dim, layers if depth is None else depth, attention_heads or num_heads)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in resolved):
            raise JumpflowError(f"dit hidden_size, depth and attention_heads must be positive ints, got "
                                f"hidden_size={resolved[0]!r}, depth={resolved[1]!r}, attention_heads={resolved[2]!r}")
        return (*resolved, patch)

    @staticmethod
    def _validate(shape, dim, num_heads, patch, mlp_ratio, position_embedding, in_context_tokens, adaln,
                  heads) -> None:
        if len(shape) != 3 or shape[0] < 1:
            raise JumpflowError(f"the dit backbone takes images of shape (C, H, W), got shape {shape}; "
                                f"use the mlp backbone for vectors (D,)")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise JumpflowError(f"dit patch_size must be a positive int, got {patch!r}")
        _, height, width = shape
        if height % patch or width % patch:
            raise JumpflowError(f"dit with patch_size={patch} needs H and W divisible by {patch}; got {height}x{width} "
                                f"(choose a patch size dividing both, or resize the images)")
        if num_heads < 1 or dim % num_heads:
            raise JumpflowError(f"dit hidden_size ({dim}) must be divisible by attention_heads ({num_heads})")
        if dim % 4:
            raise JumpflowError(f"dit hidden_size must be divisible by 4 (2-D sin-cos position embedding), got {dim}")
        if not mlp_ratio > 0:
            raise JumpflowError(f"dit mlp_ratio must be > 0, got {mlp_ratio}")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise JumpflowError(f"unknown dit position_embedding {position_embedding!r}; valid: "
                                f"{', '.join(POSITION_EMBEDDINGS)}")
        if isinstance(in_context_tokens, bool) or not isinstance(in_context_tokens, int) or in_context_tokens < 0:
            raise JumpflowError(f"dit in_context_tokens must be an int >= 0, got {in_context_tokens!r}")
        if not adaln and not in_context_tokens:
            raise JumpflowError("dit with adaln=False needs in_context_tokens >= 1: otherwise nothing carries t, s or "
                                "the label into the net")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise JumpflowError(f"heads must be an int >= 1, got {heads!r}")

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers (the patch embedding as a linear map too), N(0, 0.02)
        label table and time-embedding MLPs, zero biases; adaLN layers (Modulation) and the output layer at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.weight.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        for module in self.cond.modules():
            if isinstance(module, TimeEmbedding):
                for layer in (module.mlp[0], module.mlp[2]):
                    nn.init.normal_(layer.weight, std=0.02)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if self.in_context_tokens:
            nn.init.normal_(self.context_position, std=0.02)
        for module in self.modules():
            if isinstance(module, Modulation) and module.linear is not None:
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def conditions(self, t: Tensor, s: Tensor, cond: Optional[Tensor], extra: Optional[Tensor]) -> List[Tensor]:
        """The embedded conditions, each (B, D): [emb(t), emb(t - s), emb(label) if labelled, emb(extra_i)...];
        their sum is ConditionEmbedding's conditioning vector."""
        embed, batch = self.cond, t.shape[0]
        extra = embed.check_extra(extra, batch)
        parts = [embed.time(t), embed.gap(t - s)]
        if cond is not None:
            check_labels(cond, self.num_classes)
        if embed.label is not None:
            if cond is None:
                cond = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
            parts.append(embed.label(cond.long().reshape(-1).expand(batch)).to(parts[0].dtype))
        if extra is not None:
            parts += [embedder(extra[:, i]) for i, embedder in enumerate(embed.extra)]
        return parts

    def unpatchify(self, tokens: Tensor) -> Tensor:  # (B, N, p * p * heads * C) -> (B, heads * C, H, W)
        b, p, (rows, cols) = tokens.shape[0], self.patch_size, self.grid
        channels = self.heads * self.shape[0]
        x = tokens.reshape(b, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, channels, rows * p, cols * p)

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Optional[Tensor] = None,
                extra: Optional[Tensor] = None) -> Tensor:
        b = x.shape[0]
        if tuple(x.shape[1:]) != self.shape:
            raise JumpflowError(f"this dit was built for images of shape {self.shape}, got {tuple(x.shape[1:])}")
        parts = self.conditions(batch_times(t, b), batch_times(s, b), cond, extra)
        c = torch.stack(parts).sum(0)  # (B, D): the adaLN conditioning vector
        h = self.patchify(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
        h = h + self.position.to(h.dtype)
        context = 0
        if self.in_context_tokens:
            tokens = torch.stack(parts, dim=1)[:, :, None] + self.context_position  # (B, conditions, k, D)
            tokens = tokens.flatten(1, 2).to(h.dtype)
            context = tokens.shape[1]
            h = torch.cat([tokens, h], dim=1)
        for block in self.blocks:
            h = block(h, c)
        h = h[:, context:]  # the in-context tokens carry no output
        shift, scale = self.final_modulation(c)
        out = self.out(modulate(layer_norm(h), shift, scale).to(h.dtype))  # (B, N, p * p * heads * C)
        return self.unpatchify(out).to(x.dtype)
