"""A --model value -> what it is -> a loaded backend, and back to disk (checkpoints, exports).

    from segcli.models import resolve_model, load_model
    spec = resolve_model("clip-dense")        # kind, family, architecture, weights, downloads?
    backend = load_model(spec, torch.device("cpu")).backend

The names load on first use (torch comes with them), so importing the package costs nothing.
"""

import importlib

_EXPORTS = {name: "segcli.models.factory" for name in
            ("ModelSpec", "LoadedModel", "UNTRAINED_WARNING", "resolve_model", "load_model", "describe_model")}
_EXPORTS.update(DEFAULT_MODEL="segcli.models.families", FAMILIES="segcli.models.families")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
