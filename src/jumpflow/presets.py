"""Named starting points for `jumpflow train --preset NAME`; flags and key=value overrides apply on top.

Two kinds: CPU presets (`toy`, `digits`) that finish in minutes, and GPU recipes (`meanflow-cifar10`, `imf-dit`) that
write a paper's training recipe down as far as jumpflow can express it. Each recipe's comment block gives the source
of every value ([paper], [code] as in METHODS.md; [ours] where we chose), what differs from the paper and why, and the
paper's number it is aiming at. Those numbers are the papers', not results of these presets: nothing here has been
trained to the end (see the README's "Recipes (GPU)").
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from .errors import JumpflowError

# MeanFlow, CIFAR-10, unconditional, 1-NFE FID 2.92 [paper] / ~2.8-2.9 with the py-meanflow "v1" sampler [code README]
# (Geng et al. 2025, arXiv 2505.13447; METHODS.md A2). [code] = Gsunshine/py-meanflow, whose CIFAR-10 script and
# argument defaults were read through public forks of it; the values below agree with METHODS.md A2 where it has them.
# - (t, r): t ~ LN(-0.6, 1.6), r ~ LN(-4.0, 1.6), r = min(r, t) ("v1", time_pair="independent"); the code's ratio=0.75
#   means 75% of pairs have r != t, i.e. flow_matching_share (the share with r = t) = 0.25 [code; A2 warns that the
#   ImageNet config's "0.75" means the opposite]. Adaptive weight power 0.75 [code], eps 1e-3 [code default norm_eps;
#   METHODS' 0.01 is the JAX/ImageNet value]; per-sample sums of squares as in jumpflow's meanflow.
# - Net: the code's U-Net is EDM's DDPM++ layout (128 channels, mult (2, 2, 2), 4 blocks per level, attention at
#   16x16, dropout 0.2) [code], ~55M parameters [paper]. jumpflow's UNet with the same layout has 57.6M
#   (57,624,323, counted on the meta device; tests/test_presets.py keeps it within 10% of 55M): its decoder has
#   num_res_blocks + 1 blocks per level and its conditioning is adaptive GroupNorm, not DDPM++'s exact blocks.
#   Dropout 0.2 [code] (the JVP self-check runs in eval mode; a finite-difference JVP replays one dropout mask).
# - Optimiser: Adam (0.9, 0.999), no weight decay, lr 6e-4 constant after 200 warm-up epochs (= 9766 steps at batch
#   1024) [code]; no gradient clipping in the code's loop [code] so grad_clip=0; global batch 1024 (8 GPUs x 128)
#   [code]; 800k iterations [METHODS A2; the script's 16000 epochs are 781k]. EMA 0.9999 [code; it also keeps extra
#   EMAs at 0.99995 and 0.9996, which jumpflow's single EMA cannot].
# - Augmentation: horizontal flips [code]. The code also applies EDM's augmentation pipeline (p = 0.12, with the
#   augmentation labels as a network condition) [code]; jumpflow has no such pipeline, so it is left out (its effect
#   on FID is not measured here).
# - bf16 / compile / channels-last "auto" [ours: on for CUDA]; MeanFlow's JVP forward runs in fp32 whatever
#   `precision` says, as in the official code. If batch 1024 does not fit one GPU's memory, add grad_accum=N or run
#   under torchrun (batch_size stays the global batch).
# - Data: the CIFAR-10 files on disk (data_options.root=... or $JUMPFLOW_CIFAR10); nothing is downloaded.
_MEANFLOW_CIFAR10: Dict[str, Any] = {
    "method": "meanflow",
    "method_options": {"time_sampler": "logit_normal", "time_pair": "independent", "time_mean": -0.6,
                       "time_std": 1.6, "r_mean": -4.0, "r_std": 1.6, "flow_matching_share": 0.25,
                       "adaptive_power": 0.75, "adaptive_eps": 1e-3},
    "data": "cifar10", "data_options": {"hflip": True}, "class_conditional": False,
    "backbone": "unet",
    "backbone_options": {"channels": 128, "channel_mult": [2, 2, 2], "num_res_blocks": 4,
                         "attention_resolutions": [16], "dropout": 0.2},
    "batch_size": 1024, "lr": 6e-4, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.0,
    "warmup_steps": 9766, "lr_schedule": "constant", "grad_clip": 0.0, "ema_decay": 0.9999, "steps": 800_000,
    "precision": "auto", "compile": "auto", "channels_last": "auto",
    "log_every": 100, "sample_every": 10_000, "sample_steps": [1, 2], "checkpoint_every": 10_000,
}

# Improved MeanFlow (iMF), class-conditional DiT-B/2 with in-context conditioning (Geng et al. 2025, arXiv 2512.02012;
# METHODS.md A3). [code] = Lyy-iiis/imeanflow configs. TARGET, NOT REPRODUCED: ImageNet 256x256 (SD-VAE latents
# 32x32x4), 1-NFE FID iMF-B/2 3.39, M/2 2.27, L/2 1.86, XL/2 1.72; XL/2 2-NFE 1.54 [code README].
# - Data: class-conditional CIFAR-10 (3x32x32 pixels) [ours]. ImageNet latents cannot be loaded here: a .npy/.npz is
#   read as images and must lie in [-1, 1], which SD-VAE latents (std ~1) do not. CIFAR-10 at patch 2 gives the
#   same 256-token sequence as ImageNet-256 latents at patch 2, so the transformer does the same work per step.
#   With latents rescaled into [-1, 1] and labels under `y`, data=latents.npz runs the same recipe.
# - Method: every iMF default in jumpflow is the official ImageNet value, repeated here so the recipe reads whole:
#   (t, r) from two LN(-0.4, 1.0) draws, 50% of the batch r = t, omega in [1, 8] log-uniform (cfg_beta 1), interval
#   t_min ~ U[0, 0.5], t_max ~ U[0.5, 1], 10% class dropout, adaptive power 1.0 and eps 0.01 [code].
# - Net: DiT-B/2 (768 wide, 12 blocks, 12 heads) [paper's B/2 width], conditions as in-context tokens only
#   (adaln=False) [paper]. jumpflow gives each of its 6 conditions (t, t - r, label, omega, t_min, t_max) the same k=4
#   tokens (24 in all; iMF: 8 class + 4 omega + 2 + 2 interval + 4 time = 20). 89.1M parameters (89,051,160 on
#   CIFAR-10 with imf's two heads, meta device). Differences: iMF's net sees only h = t - r, uses RoPE and QK
#   RMSNorm, and gives the u and v heads 8 blocks each (4 shared); jumpflow embeds t as well, uses sin-cos positions
#   and shares every block, the heads differing only in the output layer.
# - Optimiser: batch 1024, lr 1e-4 constant after a 10-epoch warm-up, Adam beta2 0.95 (beta1 the Adam default 0.9),
#   EMA 0.9999 [code]; no clipping in the released config, so grad_clip=0. Steps: 640 ImageNet epochs at batch 1024
#   are ~800k updates [code], kept as updates (640 CIFAR-10 epochs would be only 31k); warm-up 10 ImageNet epochs =
#   12.5k updates.
# - Augmentation: horizontal flips [ours: METHODS A3 does not say]. Evaluate at 1 step with guidance 7.5 and interval
#   (0.4, 0.65) [code config]: api load(...).generate(n, steps=1, cls=..., guidance=7.5, interval=(0.4, 0.65)).
_IMF_DIT: Dict[str, Any] = {
    "method": "imf",
    "method_options": {"time_sampler": "logit_normal", "time_mean": -0.4, "time_std": 1.0,
                       "flow_matching_share": 0.5, "guidance_max": 7.0, "guidance_beta": 1.0, "interval_split": 0.5,
                       "class_dropout": 0.1, "adaptive_power": 1.0, "adaptive_eps": 0.01},
    "data": "cifar10", "data_options": {"hflip": True}, "class_conditional": True,
    "backbone": "dit", "backbone_options": {"size": "B/2", "in_context_tokens": 4, "adaln": False},
    "batch_size": 1024, "lr": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.95, "weight_decay": 0.0,
    "warmup_steps": 12_500, "lr_schedule": "constant", "grad_clip": 0.0, "ema_decay": 0.9999, "steps": 800_000,
    "precision": "auto", "compile": "auto", "channels_last": "auto",
    "log_every": 100, "sample_every": 10_000, "sample_steps": [1, 2], "checkpoint_every": 10_000,
}

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-D toys on CPU, the benchmark's recipe (BENCHMARKS.md): about 4 minutes for MeanFlow on 2 cores.
    "toy": {"batch_size": 1024, "lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.999, "steps": 2000,
            "sample_every": 500, "checkpoint_every": 500},
    # 8x8 digits on CPU with a small UNet (1.2M parameters).
    "digits": {"data": "digits", "backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]},
               "batch_size": 128, "lr": 5e-4, "warmup_steps": 200,
               "ema_decay": 0.999, "steps": 10000, "sample_every": 2000, "checkpoint_every": 2000},
    # GPU recipes: see the comment blocks above.
    "meanflow-cifar10": _MEANFLOW_CIFAR10,
    "imf-dit": _IMF_DIT,
}


def get_preset(name: str) -> Dict[str, Any]:
    """A deep copy of preset `name` (so callers may edit its option mappings), or a JumpflowError listing them."""
    if name not in PRESETS:
        raise JumpflowError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
