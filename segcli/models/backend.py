"""The one interface predict, eval and export need from a model, whatever runs it.

A PyTorch module (`PixelTextModel`: LSeg, clip-dense) and an ONNX session (`OnnxModel`) both
implement it, each saying honestly what it can do, as ultralytics' AutoBackend does for its formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from segcli.data.labels import LabelSet


@runtime_checkable
class DenseBackend(Protocol):
    """Images -> per-pixel label logits at 1/output_stride of the input.

    open_vocabulary: any labels (label_embeddings gives [K,C]); else the labels are baked in
        (`baked_labels`), label_embeddings only checks the request and returns None.
    fixed_imgsz: the only input size it takes (an export), or None for any multiple of input_multiple.
    provides_embeddings: dense_logits can also return the pixel embeddings [B,C,h,w].
    exportable: a PyTorch module that `segcli export` can trace.
    """

    architecture: str
    open_vocabulary: bool
    baked_labels: "LabelSet | None"
    fixed_imgsz: int | None
    default_imgsz: int
    input_multiple: int
    output_stride: int
    default_prompt: str | None
    provides_embeddings: bool
    exportable: bool

    def label_embeddings(self, labels: "LabelSet", prompt: str | None = None) -> "torch.Tensor | None":
        """[K,C] L2-normalised on the model's device, or None when the labels are baked in."""

    def dense_logits(self, images: "torch.Tensor", label_embeddings: "torch.Tensor | None",
                     autocast_dtype: "torch.dtype | None" = None, return_embeddings: bool = False
                     ) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """[B,3,H,W] in [0,1] -> (logits [B,K,H/s,W/s] fp32, pixel embeddings [B,C,H/s,W/s] or None)."""

    def to(self, device) -> "DenseBackend": ...

    def eval(self) -> "DenseBackend": ...
