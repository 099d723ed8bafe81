"""What predict's process and its worker processes hand each other: small values through the
pool's pipes, large ones through files in memory, so that a worker killed halfway cannot hang the run.

concurrent.futures' workers all send their results through one pipe, whose write end the parent
holds too. A worker killed (the OOM killer, kill -9) halfway through writing a result larger than
what a pipe writes atomically (PIPE_BUF, 4 KiB on Linux) leaves the parent's reader waiting for the
rest for ever: the run neither fails nor ends (CPython 3.11-3.13; a model-size canvas is 0.4 MB).
So a worker runs each task through `call`, which answers with a Parcel under that size. A larger
value goes into a file in /dev/shm named after the run (its process and number): a small pickle,
then its arrays' bytes as they are (pickle protocol 5's out-of-band buffers), so each side copies
them once. That also costs the run's process less CPU than the pipe (0.5-0.6 ms against 0.6-1.5 ms
per 0.4 MB), so the jobs' logits travel to the workers the same way (`pack`). `unpack` reads and
removes a file; `sweep` removes those nobody read (a worker killed after writing one, a run stopped
early, a run killed outright).
"""

from __future__ import annotations

import itertools
import os
import pickle
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

# what travels inline: PIPE_BUF less room for the pool's own framing around it
ATOMIC_BYTES = 3072
PREFIX = "segcli-parcel-"
FOLDER = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
_owner: str | None = None  # the run whose files this worker writes (`serve_for`)
_written = 0
_runs = itertools.count()


@dataclass(frozen=True)
class Parcel:
    """A pickled value: in `data` when small; else in the file `name` in FOLDER, which holds that
    pickle (`data_size` bytes) followed by its out-of-band buffers (`buffer_sizes`)."""

    data: bytes | None = None
    name: str | None = None
    data_size: int = 0
    buffer_sizes: tuple[int, ...] = ()


class RemoteTraceback(Exception):
    """The worker's traceback, shown as the cause of an error raised there (as concurrent.futures does)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


def new_owner() -> str:
    """A name for one run's files: its process id (what `sweep` checks), then the run's number in it."""
    return f"{os.getpid()}.{next(_runs)}"


def serve_for(owner: str) -> None:
    """In a worker: write the files of the run `owner` (new_owner)."""
    global _owner
    _owner = owner


def pack(value, owner: str | None = None) -> Parcel:
    """`value` (picklable) as a Parcel: inline when its pickle fits in one atomic pipe write; else a
    file of the run `owner` (default: the run this worker serves)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    if len(data) + sum(v.nbytes for v in views) <= ATOMIC_BYTES:
        return Parcel(data=pickle.dumps(value, protocol=5) if views else data)
    global _written
    _written += 1
    name = f"{PREFIX}{owner or _owner or os.getpid()}-{os.getpid()}-{_written}"
    try:
        fd = os.open(FOLDER / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            for view in (memoryview(data), *views):
                while view.nbytes:
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError:  # /dev/shm full (a container's is 64 MB) or missing: through the pipe after all
        (FOLDER / name).unlink(missing_ok=True)
        return Parcel(data=pickle.dumps(value, protocol=5))
    return Parcel(name=name, data_size=len(data), buffer_sizes=tuple(v.nbytes for v in views))


def unpack(parcel):
    """The value in a Parcel (its file read and removed), or `parcel` itself when it is no Parcel."""
    if not isinstance(parcel, Parcel):
        return parcel
    if parcel.name is None:
        return pickle.loads(parcel.data)
    path = FOLDER / parcel.name
    parts = [bytearray(parcel.data_size), *(bytearray(n) for n in parcel.buffer_sizes)]
    fd = os.open(path, os.O_RDONLY)
    try:
        for part in parts:
            view = memoryview(part)
            while view.nbytes:
                got = os.readv(fd, [view])
                if not got:
                    raise EOFError(f"{parcel.name} is shorter than announced")
                view = view[got:]
    finally:
        os.close(fd)
        path.unlink()
    return pickle.loads(parts[0], buffers=parts[1:])


def call(fn, *args) -> Parcel:
    """In a worker: fn(*args), the Parcels among args unpacked; its result, or its exception for
    `result` to raise, as a Parcel."""
    try:
        outcome = (True, fn(*(unpack(a) for a in args)), None)
    except Exception as exc:
        outcome = (False, exc, "".join(traceback.format_exception(exc)))
    try:
        return pack(outcome)
    except Exception as exc:  # an exception that does not pickle: its text does
        return pack((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]} ({exc})"), outcome[2]))


def result(parcel):
    """In the run's process: what `call` computed, or its exception raised again (the worker's
    traceback as its cause). Anything but a Parcel (another executor's result) passes through."""
    if not isinstance(parcel, Parcel):
        return parcel
    ok, value, remote_traceback = unpack(parcel)
    if not ok:
        raise value from RemoteTraceback(remote_traceback)
    return value


def sweep(owner: str | None = None) -> int:
    """Remove the files of the run `owner` that nobody read, or (None) those of runs whose process is
    gone; returns how many."""
    removed = 0
    for path in FOLDER.glob(f"{PREFIX}{owner}-*" if owner is not None else f"{PREFIX}*"):
        if owner is None and _alive(path.name[len(PREFIX):].split("-")[0].split(".")[0]):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:  # gone already, or another user's (/dev/shm is sticky)
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
