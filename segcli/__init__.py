"""segcli: batch open-vocabulary semantic segmentation in the style of LSeg."""

__version__ = "0.1.0"

from segcli.api import Prediction, Segmenter  # noqa: E402

__all__ = ["Segmenter", "Prediction", "__version__"]
