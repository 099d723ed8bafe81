"""Errors a user can cause: the CLI prints their message on one line and exits with `exit_code`."""


class SegcliError(Exception):
    """A user or environment mistake (bad labels, missing model, unwritable folder). Exit status 2."""

    exit_code = 2
