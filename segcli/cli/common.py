"""What every command shares: one-line errors with their exit codes (EXIT_CODES), warnings, the
wording of the options several commands take."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from segcli.errors import SegcliError

if TYPE_CHECKING:  # the CLI imports torch only inside the commands that need it
    from segcli.inference.segmenter import Segmenter

EXIT_CODES = """Exit status: 0 all inputs done; 1 some inputs failed (see stderr and summary.json);
2 usage or environment error; 130 interrupted."""

# options that predict, relabel and eval share: one wording each
SYNONYMS_HELP = ('How a label\'s synonyms ("road;street") are scored: max (each on its own, the label keeps its best: '
                 "the training-free methods' rule, clip-dense's default) or mean (one averaged embedding: LSeg's default).")
BG_THRESHOLD_HELP = ("Pixels whose best label has a probability below this (softmax over the labels, as the training-free "
                     "methods' prob_thd, e.g. 0.1) take the first label: put the background class first.")
SHORT_SIDE_HELP = ("With windows: resize photos so the short side is N (long side at most 2048), as the training-free "
                   "methods' authors do. Default: the model's (clip-dense: 448 clearclip, 336 naclip).")
WINDOW_HELP = ("Slide windows of N pixels over the resized photo and average their logits (0: one padded canvas of "
               "--imgsz). Default: the model's (clip-dense: 448 clearclip, 224 naclip; LSeg: 0).")
STRIDE_HELP = "Window step in pixels. Default: the model's, else half the window."

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
    """predict's and eval's protocol, synonym and background options onto the Segmenter (one-line errors)."""
    seg.use_protocol(short_side, window, stride)
    seg.use_synonyms(synonyms)
    seg.use_bg_threshold(bg_threshold)
