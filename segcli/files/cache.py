"""Where segcli keeps what it can make again (remote runs' mirrors, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$XDG_CACHE_HOME/segcli, else ~/.cache/segcli."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segcli"
