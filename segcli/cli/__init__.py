"""The `segcli` command (entry point `segcli.cli:main`): one module per command group, the app in
segcli.cli.root. Loaded on first use, so `segcli --help` imports no torch."""

import importlib

_EXPORTS = {"app": "segcli.cli.root", "main": "segcli.cli.root"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
