"""The model core shared by predict, train, eval and export: the nn.Modules by role, their configs.

The modules load on first use (they import torch); `segcli.modeling.configs` is plain data.
"""

import importlib

_EXPORTS = {"CLIPDense": "segcli.modeling.clip_dense", "LSeg": "segcli.modeling.lseg",
            "build_model": "segcli.modeling.lseg", "PixelTextModel": "segcli.modeling.pixel_text"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
