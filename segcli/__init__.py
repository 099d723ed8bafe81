"""segcli: batch open-vocabulary semantic segmentation in the style of LSeg.

`import segcli` is cheap: torch and the model code load on first use of `segcli.Segmenter`, so
`segcli --help` and `segcli --version` start in a blink. The package's rooms are drawn in
ARCHITECTURE.md.
"""

from segcli.version import __version__

__all__ = ["Segmenter", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Segmenter", "Prediction"):
        from segcli.inference import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'segcli' has no attribute {name!r}")
