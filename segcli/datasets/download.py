"""Downloads that survive real networks: resume, retries, checksums, and nothing half-there.

    fetch(url, target, checksum, size)
      free space checked -> bytes into TARGET.part (resumed with an HTTP Range request after a dropped
      connection or a killed run; restarted where the server ignores Range) -> retries with backoff
      -> checksum verified -> renamed to TARGET

A wrong checksum removes the file and says so in one line; being offline says which URL to fetch by
hand. Progress goes to `on_progress(done, total)` (the CLI draws the bar).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from segcli.errors import SegcliError

CHUNK = 1 << 20
RETRIES = 5
TIMEOUT_S = 30
USER_AGENT = "segcli (https://github.com/segcli; dataset download)"


def parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    """"sha1:HEX" / "md5:HEX" / "sha256:HEX" -> (algorithm, hex); None: no published checksum."""
    if not checksum:
        return None
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ("md5", "sha1", "sha256") or not digest:
        raise ValueError(f"bad checksum spec {checksum!r}")
    return algorithm, digest.lower()


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 4):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, checksum: str | None, size: int | None, what: str, remove: bool = True) -> None:
    """SegcliError unless `path` has the expected size and checksum (where known). A file that fails
    is removed (`remove`: one segcli fetched), or left where it is (a file the user brought)."""
    actual = path.stat().st_size
    problem = f"{actual:,} bytes where {size:,} were expected" if size is not None and actual != size else None
    parsed = parse_checksum(checksum)
    if problem is None and parsed is not None:
        algorithm, expected = parsed
        got = file_digest(path, algorithm)
        if got != expected:
            problem = f"{algorithm.upper()} {got} is not the published {expected}"
    if problem is None:
        return
    if remove:
        path.unlink(missing_ok=True)
        raise SegcliError(f"{what}: {problem}; the file was removed (a corrupt download or a changed mirror)")
    raise SegcliError(f"{what}: {path}: {problem}")


def check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SegcliError(f"{what} needs {needed / 1e9:.2f} GB in {folder}, which has {free / 1e9:.2f} GB free")


def fetch(url: str, target: Path, checksum: str | None = None, size: int | None = None, what: str = "",
          on_progress: Callable[[int, int | None], None] | None = None, retries: int = RETRIES,
          backoff_s: float = 1.0) -> Path:
    """`url` -> `target` (verified), resuming TARGET.part. SegcliError, one line, on every failure."""
    what = what or target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None:
        check_space(target.parent, size - have, what)
    attempt, last_error = 0, None
    while attempt <= retries:
        try:
            _download(url, part, size, on_progress)
            break
        except _Restart:
            part.unlink(missing_ok=True)
            continue
        except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError, http.client.HTTPException, _Short) as exc:
            last_error = exc
            if isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404, 410):
                raise SegcliError(f"{what}: {url} answered {exc.code} {exc.reason}: the file is not there "
                                  "(moved, or it needs a login); get it by hand and pass --from FILE") from None
            if _offline(exc):
                raise SegcliError(f"{what}: cannot reach {url} ({_reason(exc)}); download it by hand and pass "
                                  "--from FILE") from None
            attempt += 1
            if attempt <= retries:
                time.sleep(backoff_s * 2 ** (attempt - 1))
    else:
        raise SegcliError(f"{what}: download from {url} failed {retries + 1} times ({_reason(last_error)}); "
                          f"run the same command again to resume from {part.stat().st_size if part.exists() else 0:,} bytes")
    verify(part, checksum, size, what)  # its size too: a server that sent more than announced
    os.replace(part, target)
    return target


class _Restart(Exception):
    """The server ignored our Range request: start from zero."""


class _Short(Exception):
    """The connection closed before the announced length."""


def _download(url: str, part: Path, size: int | None, on_progress) -> int:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return have
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if have and response.status != 206:  # no Range support (or a 200 from a cache): start over
            raise _Restart()
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        with open(part, "ab") as f:
            done = have
            while block := response.read(CHUNK):
                f.write(block)
                done += len(block)
                if on_progress:
                    on_progress(done, total)
    if total is not None and done < total:
        raise _Short(f"connection closed at {done:,} of {total:,} bytes")
    return done


def _offline(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, socket.gaierror) or (isinstance(reason, OSError) and reason.errno in (101, 111, 113))


def _reason(exc: BaseException | None) -> str:
    reason = getattr(exc, "reason", exc)
    return str(reason) if reason else type(exc).__name__
