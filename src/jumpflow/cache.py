"""Where jumpflow keeps things it can rebuild (trained feature networks): one folder, overridable per machine."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import JumpflowError


def cache_root() -> Path:
    """`$JUMPFLOW_CACHE`, else `$XDG_CACHE_HOME/jumpflow`, else `~/.cache/jumpflow` (the XDG default)."""
    if os.environ.get("JUMPFLOW_CACHE"):
        return Path(os.environ["JUMPFLOW_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "jumpflow"
    return Path.home() / ".cache" / "jumpflow"


def cache_dir(*parts: str) -> Path:
    """The cache sub-folder `parts` (created if missing)."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JumpflowError(f"cannot create cache folder {path} ({e}); set JUMPFLOW_CACHE to a writable folder") from e
    return path
