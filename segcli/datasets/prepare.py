"""`segcli data get` and `data list`: a dataset's archives fetched, verified, unpacked and put in place.

    archives -> ROOT/.segcli-downloads/ (resumable, verified: segcli.datasets.download)
      -> unpacked into ROOT/.segcli-get-NAME-PID/ (each archive in its own folder; paths checked)
      -> arranged as the catalog says -> renamed to ROOT/FOLDER in one step, with a marker file

A killed run leaves no half-unpacked dataset under its name (the next run removes the dead run's
folder); a second `get` finds the marker and says so at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from segcli.datasets.catalog import BENCHMARKS, DOWNLOADS, Archive, Download
from segcli.datasets.download import check_space, fetch, verify
from segcli.errors import SegcliError
from segcli.files.atomic import atomic_write_json
from segcli.files.lock import pid_running
from segcli.version import __version__

MARKER = ".segcli-dataset.json"
DOWNLOADS_DIR = ".segcli-downloads"


def default_root(root: str | Path | None = None) -> Path:
    """Where datasets live: --root, else $SEGCLI_DATA, else ./data."""
    return Path(root or os.environ.get("SEGCLI_DATA") or "data").expanduser()


def get_command(name: str, root: Path) -> str:
    """The one line that fixes a missing dataset."""
    download = BENCHMARKS[name].download if name in BENCHMARKS else name
    return f"segcli data get {download} --root {root}"


def present(download: Download, root: Path) -> dict | None:
    """The marker of a prepared download under `root`, or None."""
    try:
        return json.loads((root / download.folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def listing(root: Path) -> list[dict]:
    """What `segcli data list` shows: every download, its size, licence, login, and whether it is here."""
    rows = []
    for d in DOWNLOADS.values():
        marker = present(d, root)
        rows.append({"name": d.name, "title": d.title, "size": d.size_text, "licence": d.licence, "login": d.login,
                     "present": bool(marker), "splits": marker.get("splits") if marker else None,
                     "benchmarks": [b.name for b in BENCHMARKS.values() if b.download == d.name],
                     "path": str(root / d.folder)})
    return rows


def get(name: str, root: Path, source: str | None = None, splits: tuple[str, ...] = ("train", "val"),
        on_progress: Callable[[str, int, int | None], None] | None = None, keep_archives: bool = False) -> tuple[Path, str]:
    """Fetch and prepare the download `name` under `root`: (its folder, what happened in words)."""
    if name in BENCHMARKS and name not in DOWNLOADS:  # voc20 is read from voc2012's files
        name = BENCHMARKS[name].download
    if name not in DOWNLOADS:
        raise SegcliError(f"unknown dataset {name!r}: use one of {', '.join(DOWNLOADS)} (or a benchmark: "
                          f"{', '.join(BENCHMARKS)})")
    download = DOWNLOADS[name]
    target = root / download.folder
    marker = present(download, root)
    if marker and set(splits) <= set(marker.get("splits", ())):
        return target, f"already present, verified on {marker.get('prepared', '?')[:10]}"
    if marker:  # more splits into a dataset that is here: it is made again whole, with the ones it had
        splits = tuple(sorted(set(splits) | set(marker.get("splits", ()))))
    if target.exists() and not marker:
        raise SegcliError(f"{target} exists but was not prepared by segcli data get: move it away, or use it as it "
                          "is with --data-root")
    root.mkdir(parents=True, exist_ok=True)
    if source and _prepared_folder(download, Path(source).expanduser(), splits):
        return _adopt(download, Path(source).expanduser(), target, splits)
    if download.prepared_elsewhere or (download.login and not source):
        raise SegcliError(f"{name} cannot be fetched by segcli: {download.manual}")
    archives = [a for a in download.archives if set(a.splits) & set(splits)]
    files = [_archive(a, root, source, download, on_progress) for a in archives]
    work = root / f".segcli-get-{name}-{os.getpid()}"
    _sweep_dead(root, name)
    try:
        check_space(root, sum(p.stat().st_size for p in files) * 11 // 10, f"unpacking {name}")
        unpacked = work / "unpacked"
        for archive, path in zip(archives, files):
            _unpack(path, unpacked / _stem(archive.name))
        prepared = _arrange(download, unpacked, work / "prepared", archives)
        record = {"name": name, "splits": sorted(set(splits)), "prepared": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "segcli_version": __version__,
                  "archives": [{"name": a.name, "checksum": a.checksum, "bytes": p.stat().st_size}
                               for a, p in zip(archives, files)]}
        if marker:
            shutil.rmtree(target)
        atomic_write_json(prepared / MARKER, record)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(prepared, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_archives:  # what was fetched here (never a file of the user's)
        for path in files:
            if path.parent == root / DOWNLOADS_DIR:
                path.unlink(missing_ok=True)
    return target, f"prepared ({', '.join(sorted(set(splits)))})"


def _archive(archive: Archive, root: Path, source: str | None, download: Download, on_progress) -> Path:
    """The verified archive file: from --from (a file, a folder holding it, or a mirror URL) or its URL."""
    what = f"{download.name}: {archive.name}"
    if source and not source.startswith(("http://", "https://")):
        src = Path(source).expanduser()
        path = src / archive.name if src.is_dir() else src
        if not path.is_file():
            raise SegcliError(f"{what}: {path} not found (--from takes the archive, or a folder holding it)")
        verify(path, archive.checksum, archive.size, what, remove=False)  # the user's own file: never deleted
        return path
    url = source.rstrip("/") + "/" + archive.name if source else archive.url
    if url is None:
        raise SegcliError(f"{what}: {download.manual}")
    target = root / DOWNLOADS_DIR / archive.name
    if target.exists():  # fetched by an earlier run that stopped later on: checked again before use
        verify(target, archive.checksum, archive.size, what)
        return target
    return fetch(url, target, archive.checksum, archive.size, what,
                 on_progress=(lambda done, total: on_progress(archive.name, done, total)) if on_progress else None)


def _stem(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _unpack(path: Path, into: Path) -> None:
    """Unpack a zip or tar into `into`; member paths that would land outside it are refused."""
    into.mkdir(parents=True, exist_ok=True)
    real = into.resolve()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    if not (real / member).resolve().is_relative_to(real):
                        raise SegcliError(f"{path.name}: member {member!r} would land outside the dataset; refused")
                z.extractall(into)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                    t.extractall(into, filter="data")  # refuses absolute paths, .., links out, devices
                else:
                    for member in t.getmembers():
                        if not (member.isfile() or member.isdir()) or not (real / member.name).resolve().is_relative_to(real):
                            raise SegcliError(f"{path.name}: member {member.name!r} is not a plain file inside the "
                                              "dataset; refused")
                    t.extractall(into)
        else:
            raise SegcliError(f"{path.name} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise SegcliError(f"{path.name}: a damaged archive ({exc}); delete it and run again") from None


def _arrange(download: Download, unpacked: Path, prepared: Path, archives: list[Archive]) -> Path:
    """The catalog's layout from what the archives held."""
    if not download.moves:
        parts = [unpacked / _stem(a.name) for a in archives]
        prepared.mkdir(parents=True)
        for part in parts:
            for child in part.iterdir():
                os.replace(child, prepared / child.name)
        return prepared
    unpacked_stems = {_stem(a.name) for a in archives}
    used = set()
    for src, dst in download.moves:
        origin = unpacked / src
        if not origin.exists():
            continue  # a split that was not asked for (train2017/ of a --split val run)
        destination = prepared if dst == "." else prepared / dst
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(origin, destination)
        used.add(src.split("/")[0])
    if unpacked_stems - used:
        raise SegcliError(f"{download.name}: {', '.join(sorted(unpacked_stems - used))} did not hold the expected "
                          f"layout ({', '.join(src for src, _ in download.moves)})")
    return prepared


def _prepared_folder(download: Download, folder: Path, splits: tuple[str, ...]) -> bool:
    """`folder` already holds the download in the catalog's layout (images and masks of every split)."""
    bench = next(b for b in BENCHMARKS.values() if b.download == download.name)
    return folder.is_dir() and all((folder / sub).is_dir() for split in splits
                                   for sub in (bench.images[split][0], bench.masks[split][0]))


def _adopt(download: Download, folder: Path, target: Path, splits: tuple[str, ...]) -> tuple[Path, str]:
    """--from a folder already in the catalog's layout (e.g. PASCAL-Context converted by mmsegmentation):
    linked into place (never copied)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(folder.resolve(), target_is_directory=True)
    record = {"name": download.name, "splits": sorted(set(splits)), "prepared": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "segcli_version": __version__, "adopted": str(folder.resolve())}
    try:
        atomic_write_json(target / MARKER, record)
    except OSError as exc:
        target.unlink()
        raise SegcliError(f"cannot write the marker into {folder} ({exc.strerror})") from None
    return target, f"linked to {folder.resolve()}"


def _sweep_dead(root: Path, name: str) -> None:
    """Remove the unpacking folders of `get` runs that were killed (their pid is gone)."""
    for folder in root.glob(f".segcli-get-{name}-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
