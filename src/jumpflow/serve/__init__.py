"""`jumpflow serve`: a live page and an HTTP API for a trained model, with micro-batched generation.

The web pieces (Starlette, uvicorn) are an extra, `pip install 'jumpflow[serve]'`; they load only when a server is
built, so `import jumpflow` stays light. The micro-batcher is plain asyncio and usable on its own.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import JumpflowError
from .batcher import BatchResult, MicroBatcher, QueueFull

EXTRA_MODULES = ("starlette", "uvicorn")


def require_extra() -> None:
    """A clear error naming the extra when the web packages are missing."""
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise JumpflowError(f"`jumpflow serve` needs {' and '.join(missing)}, which are not installed: "
                            f"pip install 'jumpflow[serve]'")


def create_app(model, teacher=None, **options: Any):
    """The ASGI app for a `jumpflow.load`ed model (see `jumpflow.serve.app.create_app` for the options)."""
    require_extra()
    from .app import create_app as build

    return build(model, teacher, **options)


def run_server(ckpt: str, teacher=None, **options: Any) -> None:
    """Load `ckpt` (and `teacher`) and serve them with uvicorn until interrupted (`jumpflow serve`)."""
    require_extra()
    from .app import run_server as run

    run(ckpt, teacher, **options)


__all__ = ["create_app", "run_server", "require_extra", "MicroBatcher", "BatchResult", "QueueFull"]
