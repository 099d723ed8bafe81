"""Stored pixel embeddings: the file format, finding a run's files, and search over them.

    from segcli import embeddings
    e = embeddings.load("out/photo_embed.safetensors", seg)   # a PixelEmbeddings
    e.query("cat,dog")                                        # a label map, without the image encoder
"""

import importlib

_EXPORTS = {name: "segcli.embeddings.format" for name in ("EmbeddingInfo", "PixelEmbeddings", "load")}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
