"""A lock on a run folder, so that two runs never fill one folder at once.

The lock is a small JSON file in DIR/.segcli naming its holder (host, pid, the pid's start time,
when, what). It is created with O_EXCL, so of two runs starting together exactly one gets it. A
lock whose holder is gone (same host, pid no longer running, or running but started at another
time: the pid was reused) is stale and taken over with a warning; a lock from another host cannot be
checked and is respected (its message says which file to delete if that run is gone).

Shards of one split (--shard I/N, the same N) each hold their own lock and share the folder; any
other pair of runs into one folder conflicts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from segcli.errors import SegcliError
from segcli.files import atomic

LOCK_GLOB = "lock*.json"


def _pid_start(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, Linux), to tell a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_running(pid: int, started: int | None = None) -> bool:
    """Whether the process `pid` (started at `started`, when known) still runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process holds the pid
    now = _pid_start(pid)
    return started is None or now is None or now == started


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: int | None
    since: str  # local time, for people
    what: str  # e.g. "predict", "predict shard 1/4", "train"

    @classmethod
    def me(cls, what: str) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()), time.strftime("%Y-%m-%d %H:%M:%S"), what)

    def alive(self) -> bool:
        if self.host != socket.gethostname():
            return True  # cannot be checked from here
        return pid_running(self.pid, self.pid_start)

    def describe(self) -> str:
        return f"{self.what}, pid {self.pid} on {self.host} since {self.since}" if self.pid else self.what


def _read(path: Path) -> Holder | None:
    """The holder named in `path`; None when the file is gone. A file that does not parse is a
    lock being written right now, or the wreck of a kill during those microseconds: judged by age."""
    try:
        text = path.read_text(encoding="utf-8")
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        if age < 60:
            return Holder("?", 0, None, "?", "a run that is starting now")  # "?": not checkable, respected
        return Holder(socket.gethostname(), 0, None, "?", "an unreadable lock")  # pid 0: gone


class FolderLock:
    """Held from `acquire` to `release`. `name` is this run's lock file (e.g. "lock.json",
    "lock.shard-1-of-4.json"); `conflicts(other_name)` says whether another lock file excludes it."""

    def __init__(self, state_dir: Path, name: str, what: str, conflicts: Callable[[str], bool],
                 warn: Callable[[str], None] | None = None):
        self.state_dir, self.path, self.what, self.conflicts = state_dir, state_dir / name, what, conflicts
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.me = Holder.me(what)
        self.held = False

    def acquire(self) -> "FolderLock":
        folder = self.state_dir.parent
        for _ in range(5):  # each pass either takes the lock, fails, or removes a stale one and tries again
            holder = self._create()
            if holder is None:
                break
            if holder.alive():
                raise self._busy(folder, holder, self.path)
            self._take_over(self.path, holder)
        else:
            raise SegcliError(f"{folder}: cannot take the run lock {self.path} (other runs keep taking it)")
        for other in sorted(self.state_dir.glob(LOCK_GLOB)):
            if other == self.path or not self.conflicts(other.name):
                continue
            holder = _read(other)
            if holder is None:
                continue
            if holder.alive():
                self.release()
                raise self._busy(folder, holder, other)
            self._take_over(other, holder)
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = _read(self.path)
            if holder is not None and (holder.host, holder.pid) == (self.me.host, self.me.pid):
                self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a folder that held only the lock goes too
                self.state_dir.rmdir()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> Holder | None:
        """Create the lock file with our name in it: None when we now hold it, else its holder."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return _read(self.path) or Holder(socket.gethostname(), 0, None, "", "")  # gone meanwhile: try again
        try:
            atomic.write_all(fd, json.dumps(asdict(self.me)).encode())
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.held = True
        return None

    def _take_over(self, path: Path, holder: Holder) -> None:
        if _read(path) != holder:  # another run took it over meanwhile: leave theirs alone, look again
            return
        if holder.pid:
            self.warn(f"{self.state_dir.parent}: taking over the lock of a run that is gone ({holder.describe()})")
        path.unlink(missing_ok=True)

    def _busy(self, folder: Path, holder: Holder, path: Path) -> SegcliError:
        remote = holder.host != socket.gethostname()
        hint = f"; if that run is gone, delete {path}" if remote else ""
        return SegcliError(f"{folder} is in use by another segcli run ({holder.describe()}): wait for it to "
                           f"finish, or use another output folder{hint}")
