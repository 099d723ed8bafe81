"""Options records defined once (no torch): a dataclass field carries what its command-line option
needs, so `segcli.cli` generates the commands from `TrainOptions` and `PredictOptions` and the
Python API checks the same choices and bounds."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from segcli.errors import SegcliError


def option(default, help: str, *flags: str, min: float | None = None, max: float | None = None,
           choices: tuple[str, ...] | None = None):
    """A dataclass field with its option's flags, help, bounds and choices (read by the CLI and `check_fields`)."""
    return field(default=default, metadata={"flags": flags, "help": help, "min": min, "max": max, "choices": choices})


def check_fields(options) -> None:
    """Every field's choices and bounds, as the command line would check them: one line naming the
    option (its long flag) and what it takes."""
    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or not meta:
            continue
        flag = next((x.split("/")[0] for x in meta["flags"] if x.startswith("--")), f.name)
        if meta.get("choices") and value not in meta["choices"]:
            *first, last = meta["choices"]
            raise SegcliError(f"{flag} {value!r}: use {', '.join(first)} or {last}")
        low, high = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                (low is not None and value < low) or (high is not None and value > high)):
            bounds = f"from {low} to {high}" if low is not None and high is not None else (
                f"{low} or more" if low is not None else f"at most {high}")
            raise SegcliError(f"{flag} {value}: takes {bounds}")
