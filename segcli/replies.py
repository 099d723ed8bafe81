"""Worker replies that cannot wedge the pool when a worker is killed halfway through one.

concurrent.futures' workers all send their results through one pipe, whose write end the parent
holds too. A worker killed (the OOM killer, kill -9) halfway through writing a reply larger than
what a pipe writes atomically (PIPE_BUF, 4 KiB on Linux) leaves the parent's reader waiting for the
rest for ever: the run neither fails nor ends (CPython 3.11-3.13; a model-size canvas is 0.4 MB). So
a worker runs each task through `call`, which keeps the reply under that size. A larger result goes
into a file in memory (/dev/shm) named after the run's process: its arrays' bytes as they are, beside
a small pickle (pickle protocol 5's out-of-band buffers), so that each side copies them once.
`opened` reads and removes it; `sweep` removes those that nobody read (a worker killed after
writing one, a run stopped early, a run killed outright).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

# what `call` sends back whole: PIPE_BUF less room for the pool's own framing of the reply
ATOMIC_BYTES = 3072
PREFIX = "segcli-reply-"
FOLDER = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
_owner: int | None = None  # the run's process, whose replies these are (set by `serve_for`)
_sent = 0


@dataclass(frozen=True)
class Reply:
    """A task's outcome, pickled: in `data` when small; else in the file `name` in FOLDER, which holds
    that pickle (`data_size` bytes) followed by its out-of-band buffers (`buffer_sizes`)."""

    data: bytes | None = None
    name: str | None = None
    data_size: int = 0
    buffer_sizes: tuple[int, ...] = ()


class RemoteTraceback(Exception):
    """The worker's traceback, shown as the cause of an error raised there (as concurrent.futures does)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def serve_for(owner_pid: int) -> None:
    """In a worker: name the reply files after the run's process `owner_pid`."""
    global _owner
    _owner = owner_pid


def call(fn, *args) -> Reply:
    """In a worker: fn(*args), its result or its exception, as a Reply whose pickle fits in one
    atomic pipe write."""
    try:
        outcome = (True, fn(*args), None)
    except Exception as exc:  # raised again in the run's process by `opened`, with this traceback
        outcome = (False, exc, "".join(traceback.format_exception(exc)))
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(outcome, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:  # an exception that does not pickle: its text does
        outcome = (False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({exc})"), outcome[2])
        data = pickle.dumps(outcome, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    if len(data) + sum(v.nbytes for v in views) <= ATOMIC_BYTES:
        return Reply(data=pickle.dumps(outcome, protocol=5) if views else data)
    return _write(data, views)


def _write(data: bytes, views: list[memoryview]) -> Reply:
    global _sent
    _sent += 1
    name = f"{PREFIX}{_owner or os.getpid()}-{os.getpid()}-{_sent}"
    fd = os.open(FOLDER / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        for view in (memoryview(data), *views):
            while view.nbytes:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return Reply(name=name, data_size=len(data), buffer_sizes=tuple(v.nbytes for v in views))


def opened(reply):
    """In the run's process: the task's result from its Reply (raising the task's exception), or
    `reply` itself when it is no Reply (a future of another executor)."""
    if not isinstance(reply, Reply):
        return reply
    if reply.name is None:
        ok, value, remote_traceback = pickle.loads(reply.data)
    else:
        path = FOLDER / reply.name
        parts = [bytearray(reply.data_size), *(bytearray(n) for n in reply.buffer_sizes)]
        fd = os.open(path, os.O_RDONLY)
        try:
            for part in parts:
                view = memoryview(part)
                while view.nbytes:
                    got = os.readv(fd, [view])
                    if not got:
                        raise EOFError(f"reply {reply.name} is shorter than announced")
                    view = view[got:]
        finally:
            os.close(fd)
            path.unlink()
        ok, value, remote_traceback = pickle.loads(parts[0], buffers=parts[1:])
    if not ok:
        raise value from RemoteTraceback(remote_traceback)
    return value


def sweep(owner_pid: int | None = None) -> int:
    """Remove the reply files of `owner_pid`'s run that were never opened, or (None) those of runs
    whose process is gone; returns how many."""
    removed = 0
    for path in FOLDER.glob(f"{PREFIX}{owner_pid}-*" if owner_pid is not None else f"{PREFIX}*"):
        if owner_pid is None and _alive(path.name[len(PREFIX):].split("-")[0]):
            continue
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
