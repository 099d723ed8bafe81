"""The model core shared by predict, train, eval and export."""

from segcli.modeling.lseg import LSeg, build_model

__all__ = ["LSeg", "build_model"]
