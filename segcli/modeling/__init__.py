"""The model core shared by predict, train, eval and export."""

from segcli.modeling.clip_dense import CLIPDense
from segcli.modeling.lseg import LSeg, build_model
from segcli.modeling.pixel_text import PixelTextModel

__all__ = ["CLIPDense", "LSeg", "PixelTextModel", "build_model"]
