"""SOURCE arguments -> the list of input files and where their outputs go inside DIR.

SOURCE may be a file, a folder (recursive), a glob, a text file listing paths, or "-" (paths on
stdin). A folder's images are placed relative to that folder; all other named files (files, globs,
lists, stdin) relative to the deepest folder they share. Output locations are always relative, with
no ".." and no absolute part, so nothing can make segcli write outside DIR.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segcli.errors import SegcliError
from segcli.inputs.images import IMAGE_SUFFIXES, has_image_signature, looks_like_image, read_head

LIST_SUFFIXES = {".txt", ".lst", ".list"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}


@dataclass(frozen=True)
class Source:
    path: Path  # where to read it
    display: str  # as the user named it
    rel: PurePosixPath  # output location inside DIR, without suffix: outputs are REL_mask.png ...
    error: str | None = None  # known bad before decoding (e.g. a listed file that does not exist)
    video: bool = False  # a video (by content, or by extension when unreadable): segcli.pipeline.video
    origin: str | None = None  # the object's URL when `path` is a local copy of it (segcli.pipeline.remote)

    @property
    def recorded_path(self) -> str:
        """What records say the input was read from: its URL, or its path."""
        return self.origin or str(self.path)


@dataclass
class SourceList:
    sources: list[Source] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # non-image files found while walking folders


def _placed(paths: list[Path]) -> list[PurePosixPath]:
    """Output locations of named files: relative to the deepest folder they all share, so one file
    lands directly in DIR and none can escape it (no "..", no absolute part)."""
    if not paths:
        return []
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.dirname(absolute[0]) if len(absolute) == 1 else os.path.commonpath(absolute)
    if common in absolute:  # a missing "file" that is a prefix of another path: place it by its folder
        common = os.path.dirname(common)
    return [PurePosixPath(*Path(os.path.relpath(a, common)).parts) for a in absolute]


def looks_like_video(head: bytes) -> bool:
    """MP4/MOV (an ftyp box), Matroska/WebM (EBML), AVI (RIFF AVI) by their first bytes."""
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI")


def input_kind(path: Path) -> str | None:
    """"image" or "video" by the file's first bytes (read once), else by its extension (a broken
    file is still reported as what it claims to be); None for anything else."""
    head = read_head(path)
    if has_image_signature(head):
        return "image"
    if looks_like_video(head):
        return "video"
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def _walk(folder: Path, exclude: Path | None) -> tuple[dict[Path, str], list[str], list[tuple[Path, str]]]:
    """({image or video file: its kind}, other files, folders that could not be read with why),
    all sorted by path."""
    images: dict[Path, str] = {}
    skipped, unreadable = [], []

    def failed(exc: OSError) -> None:  # a subfolder that vanished or cannot be read: reported, not skipped
        unreadable.append((Path(exc.filename or folder), exc.strerror or str(exc)))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=failed):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = here / name
            kind = input_kind(p)
            if kind:
                images[p] = kind
            else:
                skipped.append(str(p))
    return images, skipped, unreadable


def _read_list(lines: list[str], base: Path | None) -> list[tuple[Path, str]]:
    out = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        out.append((p, entry))
    return out


def collect_sources(args: list[str], stdin_lines=None, exclude: Path | None = None) -> SourceList:
    """Expand SOURCE arguments. Raises SegcliError for a SOURCE that names nothing."""
    result = SourceList()
    seen: set[Path] = set()
    kinds: dict[Path, str] = {}  # what walking the folders found out, so no file is read twice
    exclude = exclude.resolve() if exclude else None
    # (path, as named, output location or None: placed with the other named files, known error)
    candidates: list[tuple[Path, str, PurePosixPath | None, str | None]] = []

    def add_file(p: Path, display: str, rel: PurePosixPath | None = None, error: str | None = None) -> None:
        candidates.append((p, display, rel, error))

    for arg in args:
        if arg == "-":
            lines = list(stdin_lines) if stdin_lines is not None else []
            for p, entry in _read_list(lines, None):
                add_file(p, entry)
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            images, skipped, unreadable = _walk(path, exclude)
            kinds.update(images)
            result.skipped += skipped
            for p in images:
                add_file(p, str(p), PurePosixPath(*p.relative_to(path).parts))
            for p, why in unreadable:
                rel = PurePosixPath(*p.relative_to(path).parts, ".unreadable-folder")  # never written
                add_file(p, str(p), rel, error=f"cannot read this folder: {why}")
        elif path.is_file():
            if path.suffix.lower() in LIST_SUFFIXES and not looks_like_image(path):
                try:
                    lines = path.read_text(encoding="utf-8").splitlines()
                except (OSError, UnicodeDecodeError) as exc:
                    raise SegcliError(f"cannot read list file {arg!r}: {exc}") from None
                for p, entry in _read_list(lines, path.parent):
                    add_file(p, entry)
            else:
                add_file(path, arg)
        elif any(ch in arg for ch in "*?["):
            matches = sorted(glob.glob(arg, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            if not files:
                raise SegcliError(f"no files match {arg!r}")
            for m in files:
                add_file(Path(m), m)
        else:
            raise SegcliError(f"no such file or folder: {arg}")

    unique = []
    for p, display, rel, error in candidates:
        key = p.resolve() if p.exists() else p.absolute()
        if key in seen:
            continue
        seen.add(key)
        unique.append((p, display, rel, error))
    named = iter(_placed([p for p, _, rel, _ in unique if rel is None]))
    unique = [(p, display, rel if rel is not None else next(named), error) for p, display, rel, error in unique]
    names: dict[PurePosixPath, int] = {}
    for _, _, rel, _ in unique:
        stem = rel.with_suffix("") if rel.suffix else rel
        names[stem] = names.get(stem, 0) + 1
    taken: set[PurePosixPath] = set()
    for p, display, rel, error in unique:
        stem = rel.with_suffix("") if rel.suffix else rel
        # two inputs that differ only by extension (a.jpg, a.png) keep the extension in their NAME
        out = rel.parent / rel.name.replace(".", "_") if names[stem] > 1 else stem
        if error is None and out in taken:
            error = f"its output name {out} is already used by another input"
        elif error is None and not p.exists():
            error = "file not found"
        taken.add(out)
        video = error is None and (kinds.get(p) or input_kind(p)) == "video"
        result.sources.append(Source(path=p, display=display, rel=out, error=error, video=video))
    return result


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SegcliError(f"--shard {spec!r}: use I/N, e.g. 0/4 (shards are numbered 0..N-1)") from None
    if count < 1 or not 0 <= index < count:
        raise SegcliError(f"--shard {spec!r}: need 0 <= I < N (shards are numbered 0..N-1)")
    return index, count


def take_shard(found: SourceList, index: int, count: int) -> SourceList:
    """A deterministic 1/count of the inputs: every count-th of the list sorted by output location.

    Shards of the same input list are disjoint and together cover it, on any machine, with no
    coordination. Skipped non-image files are reported by shard 0 only.
    """
    ordered = sorted(found.sources, key=lambda s: (str(s.rel), str(s.path)))
    return SourceList(sources=ordered[index::count], skipped=found.skipped if index == 0 else [])
