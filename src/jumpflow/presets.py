"""Named starting points for `jumpflow train --preset NAME`; flags and key=value overrides apply on top."""

from __future__ import annotations

from typing import Any, Dict

from .errors import JumpflowError

PRESETS: Dict[str, Dict[str, Any]] = {
    # 2-D toys on CPU: about a minute per method on 2 cores.
    "toy": {"batch_size": 256, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.999, "steps": 3000,
            "sample_every": 1000, "checkpoint_every": 1000},
    # 8x8 digits on CPU with a small UNet (1.2M parameters).
    "digits": {"data": "digits", "backbone": "unet", "backbone_options": {"channels": 32, "channel_mult": [1, 2]},
               "batch_size": 128, "lr": 5e-4, "warmup_steps": 200,
               "ema_decay": 0.999, "steps": 10000, "sample_every": 2000, "checkpoint_every": 2000},
}


def get_preset(name: str) -> Dict[str, Any]:
    if name not in PRESETS:
        raise JumpflowError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dict(PRESETS[name])
