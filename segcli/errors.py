"""Errors a user can cause: the CLI prints their message on one line and exits with `exit_code`."""

from __future__ import annotations


class SegcliError(Exception):
    """A user or environment mistake (bad labels, missing model, unwritable folder). Exit status 2."""

    exit_code = 2


def one_line(text: str, limit: int = 200) -> str:
    """`text` on one line, at most `limit` characters, cut between words (never mid-word) with '...'."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = flat[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + "..."


def mismatch_detail(exc: Exception) -> str:
    """The informative line of torch's load_state_dict error (missing/unexpected keys, shapes)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return one_line(lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__))


def check_input_size(size: int, multiple: int, what: str = "--imgsz") -> int:
    """`size` if it is a positive multiple of `multiple`, else SegcliError with a suggestion."""
    if size < multiple:
        raise SegcliError(f"{what} {size} is too small: at least {multiple}")
    if size % multiple:
        raise SegcliError(f"{what} {size} must be a multiple of {multiple} (e.g. {size // multiple * multiple})")
    return size
