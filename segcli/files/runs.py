"""Run folders' names: a new numbered runs/KIND/N, and the hidden folder where a run keeps its state."""

from __future__ import annotations

from pathlib import Path

from segcli.errors import SegcliError

STATE_DIR = ".segcli"


def next_run_dir(base: Path = Path("runs/predict")) -> Path:
    """A new numbered folder runs/predict/N (N = 1, 2, ...), created now so parallel runs differ."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegcliError(f"cannot create output folder {base}: {exc.strerror}") from None
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    n = max(taken, default=0) + 1
    while True:
        try:
            (base / str(n)).mkdir()
            return base / str(n)
        except FileExistsError:
            n += 1
