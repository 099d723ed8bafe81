"""Atomic file writes: a temp file in the same folder, then rename. Readers never see half a file.

Temp names carry the writer's pid and host, so a later run can tell the leftovers of a killed run
(dead pid) from the live files of a concurrent run into the same folder.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".segcli-tmp-"


def _prefix() -> str:
    return f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}."


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temp path beside `path`; renames it onto `path` if the block succeeds, else removes it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(), dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _writer_alive(name: str) -> bool:
    pid, _, rest = name[len(TMP_PREFIX):].partition("@")
    host = rest.rsplit(".", 1)[0]
    if not pid.isdigit() or host != socket.gethostname():
        return True  # another machine's writer: only age tells
    try:
        os.kill(int(pid), 0)
        return int(pid) != 0
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def remove_stale_temp_files(root: Path, max_age_s: float = 3600) -> int:
    """Delete temp files under `root` left by dead writers (or older than `max_age_s`); returns how many."""
    count = 0
    now = time.time()
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.startswith(TMP_PREFIX):
                continue
            p = Path(dirpath, name)
            try:
                if not _writer_alive(name) or now - p.stat().st_mtime > max_age_s:
                    p.unlink()
                    count += 1
            except OSError:
                pass
    return count
