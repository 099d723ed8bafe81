"""segcli: batch open-vocabulary semantic segmentation in the style of LSeg.

`import segcli` is cheap: torch and the model code load on first use of `segcli.Segmenter`, so
`segcli --help` and `segcli --version` start in a blink.
"""

__version__ = "0.1.0"
__all__ = ["Segmenter", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Segmenter", "Prediction"):
        from segcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'segcli' has no attribute {name!r}")
