"""What every command shares: one-line errors with their exit codes (EXIT_CODES), warnings, the
wording of the options several commands take."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from segcli.errors import SegcliError

if TYPE_CHECKING:  # the CLI imports torch only inside the commands that need it
    from segcli.inference.segmenter import Segmenter

EXIT_CODES = """Exit status: 0 all inputs done; 1 some inputs failed (see stderr and summary.json);
2 usage or environment error; 130 interrupted."""

err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True) if err.is_terminal else print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def user_errors(fn):
    """Turn SegcliError into one line on stderr and exit status 2: no traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegcliError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:  # the environment (a full disk, permissions), not a bug: one line as well
            where = f": {exc.filename}" if exc.filename else ""
            raise fail(f"{exc.strerror or exc}{where}", 2) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_images_as(seg: Segmenter, short_side: int | None, window: int | None, stride: int | None,
                    synonyms: str | None, bg_threshold: float | None) -> None:
    """eval's protocol, synonym and background options onto the Segmenter (one-line errors)."""
    from segcli.inference.settings import InferenceSettings

    seg.configure(InferenceSettings(short_side, window, stride, synonyms, bg_threshold))


def options_signature(cls, extra: list[inspect.Parameter]) -> tuple[inspect.Signature, dict]:
    """A Typer signature with one option per field of the dataclass `cls` (flags, help and bounds
    from each field's metadata, segcli.options), then `extra`, so the CLI and the options class
    never drift apart. Choices are checked by the class itself (its `validate`), for the API too."""
    params, annotations = [], {p.name: p.annotation for p in extra}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = hints[f.name]
        option = typer.Option(f.default, *meta["flags"], help=meta["help"], min=meta.get("min"), max=meta.get("max"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[f.name] = kind
    return inspect.Signature(params + list(extra)), annotations
