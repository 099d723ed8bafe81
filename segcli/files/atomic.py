"""Writing files safely: whole or not at all, with the permissions an ordinary write would give.

Outputs are written to a temp file in the same folder, then renamed: readers never see half a file.
Temp names carry the writer's pid and host, so a later run can tell the leftovers of a killed run
(dead pid) from the live files of a concurrent run into the same folder. Every byte segcli writes
goes through `write_all`, which is also the one place the fault-injection tests break.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".segcli-tmp-"

# Failures that say the output disk cannot take more, not that one input is bad: a run stops at the
# first one (every later write would fail the same way) and the next run finishes the job.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file: 0666 less the umask (mkstemp's 0600 would hide outputs
    from a web server, a colleague or a later job under another account)."""
    return 0o666 & ~_umask()


def _prefix() -> str:
    return f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}."


def write_all(fd: int, data: bytes | memoryview) -> None:
    """All of `data` to `fd` (a short write, e.g. on a nearly full disk, raises rather than truncates)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _temp_beside(path: Path) -> tuple[int, str]:
    """(open descriptor, name) of a new temp file in `path`'s folder, with an ordinary file's mode."""
    fd, tmp = tempfile.mkstemp(prefix=_prefix(), dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temp path beside `path`; renames it onto `path` if the block succeeds, else removes it."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


class AppendLog:
    """A JSON-lines file that grows one whole line per write (records.jsonl, metrics.jsonl).

    Each line goes out in one write to an O_APPEND descriptor, unbuffered, so a failing disk fails
    that call and nothing is left to flush later. A line cut short by a kill or a full disk is closed
    with a newline on the next open, so it spoils only itself: readers skip lines that do not parse.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(self.fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                write_all(self.fd, b"\n")
        except BaseException:
            os.close(self.fd)
            raise

    def append(self, obj) -> None:
        write_all(self.fd, (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read_json_lines(path: Path) -> list[dict]:
    """The whole lines of a JSON-lines file that parse (a line cut short by a kill does not)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


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
    """Delete temp files (and a video's temp folders) under `root` left by dead writers, or older
    than `max_age_s`; returns how many."""
    count = 0
    now = time.time()
    for dirpath, dirs, files in os.walk(root):
        for name in files + dirs:
            if not name.startswith(TMP_PREFIX):
                continue
            p = Path(dirpath, name)
            try:
                if not _writer_alive(name) or now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    count += 1
            except OSError:
                pass
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
    return count
