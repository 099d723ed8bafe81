"""`segcli data get`, `list` and `synth`: the datasets one command away."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from segcli.cli.common import err, user_errors

data_app = typer.Typer(help="Datasets: fetch and prepare the benchmarks (get, list), or make synthetic ones.",
                       no_args_is_help=True)


@data_app.command("synth")
@user_errors
def data_synth(
    output: Path = typer.Argument(..., help="Folder to write (the folder: layout)."),
    train_count: int = typer.Option(400, "--train", min=1, help="Training scenes."),
    val_count: int = typer.Option(100, "--val", min=1, help="Validation scenes."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives the same scenes."),
) -> None:
    """Write procedurally drawn scenes with masks: OUT/{train,val}/{images,masks}/*.png, OUT/classes.txt."""
    from segcli.datasets.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(output, train_count, val_count, seed)
    print(f"wrote {train_count} + {val_count} scenes -> {out} (use --data folder:{out})", file=sys.stderr)


@data_app.command("list")
@user_errors
def data_list(
    root: Optional[Path] = typer.Option(None, "--root", help="Where datasets live. Default: $SEGCLI_DATA, else ./data."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """What can be fetched: size, licence, whether it needs a login, whether it is here, its benchmarks."""
    from rich.table import Table

    from segcli.datasets.prepare import default_root, listing

    root = default_root(root)
    rows = listing(root)
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"datasets under {root}")
    for column in ("name", "size", "licence", "login", "here", "benchmarks"):
        table.add_column(column)
    for row in rows:
        here = f"yes ({', '.join(row['splits'])})" if row["present"] else "no"
        table.add_row(row["name"], row["size"], row["licence"], "yes" if row["login"] else "no", here,
                      ", ".join(row["benchmarks"]))
    Console(highlight=False).print(table)


@data_app.command("get")
@user_errors
def data_get(
    name: str = typer.Argument(..., help="ade20k, voc2012, coco-stuff164k, cityscapes or context (see segcli data list)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Where datasets live. Default: $SEGCLI_DATA, else ./data."),
    source: Optional[str] = typer.Option(None, "--from", help="An archive you have (or a folder holding the archives), "
                                         "a mirror URL, or for context a folder already converted."),
    split: str = typer.Option("all", "--split", help="all, train or val: fetch only what a split needs."),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep the downloaded archives after unpacking."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Download (resumable), verify, unpack and lay out a dataset, so train and eval find it."""
    from segcli.datasets.prepare import default_root, get
    from segcli.errors import SegcliError

    if split not in ("all", "train", "val"):
        raise SegcliError(f"--split {split!r}: use all, train or val")
    splits = ("train", "val") if split == "all" else (split,)
    progress = DownloadProgress(quiet)
    with progress:
        folder, what = get(name, default_root(root), source, splits, on_progress=progress.update,
                           keep_archives=keep_archives)
    print(f"{name}: {what} -> {folder}", file=sys.stderr)


class DownloadProgress:
    """A rich bar per file on a terminal (bytes, rate, ETA); a plain line every 10% otherwise."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.tasks, self.shown = quiet, None, {}, {}

    def __enter__(self):
        if not self.quiet and err.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=err)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def update(self, name: str, done: int, total: int | None) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=total)
            self.progress.update(self.tasks[name], completed=done, total=total)
            return
        step = (done * 10 // total) if total else done >> 30  # tenths, or whole GiB when the size is unknown
        if self.shown.get(name) != step:
            self.shown[name] = step
            size = f" of {total / 1e6:,.0f} MB" if total else ""
            print(f"{name}: {done / 1e6:,.0f} MB{size}", file=sys.stderr, flush=True)
