"""Named starting points for `jumpflow train --preset NAME`; flags and key=value overrides apply on top."""

from __future__ import annotations

from typing import Any, Dict

from .errors import JumpflowError

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-D toys on CPU, the benchmark's recipe (BENCHMARKS.md): about 4 minutes for MeanFlow on 2 cores.
    "toy": {"batch_size": 1024, "lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.999, "steps": 2000,
            "sample_every": 500, "checkpoint_every": 500},
    # 8x8 digits on CPU with a small UNet (1.2M parameters).
    "digits": {"data": "digits", "backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]},
               "batch_size": 128, "lr": 5e-4, "warmup_steps": 200,
               "ema_decay": 0.999, "steps": 10000, "sample_every": 2000, "checkpoint_every": 2000},
}


def get_preset(name: str) -> Dict[str, Any]:
    if name not in PRESETS:
        raise JumpflowError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
