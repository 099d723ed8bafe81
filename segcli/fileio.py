"""Atomic file writes: a temp file in the same folder, then rename. Readers never see half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TMP_PREFIX = ".segcli-tmp-"  # stale ones (a run killed mid-write) are removed by the next run


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def remove_stale_temp_files(root: Path) -> int:
    """Delete temp files left by a killed run under `root`; returns how many."""
    count = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith(TMP_PREFIX):
                Path(dirpath, name).unlink(missing_ok=True)
                count += 1
    return count
