"""Methods register by name; `get(name, net=..., **options)` builds one, `catalogue()` describes them all."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from ..registry import Registry
from .base import LossOutput, Method, make_config

METHODS: Registry = Registry("method")


def register(cls):
    METHODS.register(cls.name)(cls)
    return cls


def get(name: str, net, shape: tuple, num_classes: int = 0, **options) -> Method:
    cls = METHODS[name]
    return cls(net, make_config(cls.Config, options), shape, num_classes)


def names() -> List[str]:
    return METHODS.names()


def distillation_names() -> List[str]:
    """The methods that train from a teacher (`jumpflow distill`)."""
    return [n for n in METHODS.names() if METHODS[n].needs_teacher]


def catalogue() -> List[Dict[str, Any]]:
    """What `jumpflow methods --json` prints: name, kind, paper, default options."""
    out = []
    for name in METHODS.names():
        cls = METHODS[name]
        summary = (cls.__doc__ or "").strip().split("\n")[0]
        out.append({"name": name, "kind": cls.kind, "paper": cls.paper, "defaults": dataclasses.asdict(cls.Config()),
                    "summary": summary})
    return out


# Importing the modules registers them.
from . import (consistency, flow_matching, imf, imm, meanflow, modular_meanflow, sct, shortcut, soflow,  # noqa: E402,F401
               split_meanflow, tvm, twinflow)
from .. import peers  # noqa: E402,F401  # peers register here too; their packages load only when built

__all__ = ["METHODS", "Method", "LossOutput", "get", "names", "catalogue", "register"]
# Distillation methods register here too.
from ..distill import (align_your_flow, consistency_distillation, dmd2, re_meanflow, reflow, sid, sim,  # noqa: E402,F401
                       slimflow)
