"""The `segcli` command: a thin Typer layer over the Python API, one module per command group.

Exit status: 0 all inputs done; 1 some inputs failed (named on stderr and in summary.json);
2 usage or environment error (bad labels, missing/corrupt model, unknown device, unwritable
output); 130 interrupted.
"""

from __future__ import annotations

import os
import sys

import typer

from segcli.cli import data, models, predict, serve, training
from segcli.cli.common import EXIT_CODES
from segcli.version import __version__

app = typer.Typer(
    name="segcli",
    help="Batch open-vocabulary semantic segmentation (LSeg-style): any labels, any folder of photos.\n\n"
    + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# in the order --help lists them
app.command("predict")(predict.predict_command)
app.command()(predict.relabel)
app.command()(predict.search)
app.command()(serve.serve)
app.command()(models.info)
app.command()(models.convert)
app.command()(training.train_command)
app.command("eval")(training.eval_command)
app.command()(models.export)
app.command("embed-labels")(models.embed_labels_command)
app.add_typer(data.data_app, name="data")


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage mistakes (unknown option, value out of range, missing argument) get one line
    and exit status 2, like every other user error, instead of click's multi-line panel."""
    # OpenMP threads that spin after each parallel op burn a core for nothing while the host side
    # works (docs: performance); sleeping instead costs the model next to nothing
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from typer._click.exceptions import UsageError  # recent typer vendors click
    except ImportError:  # older typer: click itself
        from click.exceptions import UsageError

    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "segcli"
        print(f"error: {exc.format_message()} (see '{command} --help')", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
