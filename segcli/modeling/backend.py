"""The one interface predict, eval and export need from a model, whatever runs it.

A PyTorch module (`PixelTextModel`: LSeg, clip-dense) and an ONNX session (`OnnxModel`) both
implement it, each saying honestly what it can do in one `Capabilities` record, as ultralytics'
AutoBackend does for its formats. Callers read that record; they never guess with defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from segcli.inputs.geometry import Protocol as ImageProtocol
    from segcli.vocabulary.labels import LabelSet


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, declared once by the backend itself.

    family: the model family ("lseg", "clip-dense", ...), as checkpoints and run records name it.
    method: the training-free method of a clip-dense model ("naclip", "corrclip", ...), else None.
    provides_embeddings: dense_logits can also return the pixel embeddings [B,C,h,w].
    exportable: a PyTorch module that `segcli export` (and --compile) can trace.
    int8: `quantize_int8()` turns the image branch's linear layers into dynamic int8.
    needs_regions: dense_logits reads each input's region ids [B,H,W] (corrclip): the
        backend's `region_generator` makes them.
    limits: why embeddings or export are off, when they are (said in the one-line refusal).
    probability_scale: logits x this are the logits of the method's own softmax (--bg-threshold).
    default_synonyms: how a label's synonyms are scored unless asked: "max" or "mean".
    default_protocol: how images meet the model unless asked (None: one canvas of imgsz).
    default_refine: the refinement its published numbers use ("pamr") or "none": --refine auto.
    scores: "logits" (a softmax over the labels, at probability_scale, gives probabilities) or
        "sigmoid" (each label's score is its own probability already: catseg).
    """

    family: str
    method: str | None = None
    provides_embeddings: bool = True
    exportable: bool = True
    int8: bool = False
    needs_regions: bool = False
    limits: str | None = None
    probability_scale: float = 1.0
    default_synonyms: str = "mean"
    default_protocol: "ImageProtocol | None" = None
    default_refine: str = "none"
    scores: str = "logits"


@runtime_checkable
class DenseBackend(Protocol):
    """Images -> per-pixel label logits at 1/output_stride of the input.

    open_vocabulary: any labels (label_embeddings gives [K,C]); else the labels are baked in
        (`baked_labels`), label_embeddings only checks the request and returns None.
    fixed_imgsz: the only input size it takes (an export), or None for any multiple of input_multiple.
    capabilities: what else it can do (see Capabilities).
    region_generator: the module that makes region masks, for a model that `needs_regions`; else None.
    """

    architecture: str
    open_vocabulary: bool
    baked_labels: "LabelSet | None"
    fixed_imgsz: int | None
    default_imgsz: int
    input_multiple: int
    output_stride: int
    default_prompt: str | None
    capabilities: Capabilities
    region_generator: "nn.Module | None"

    def label_embeddings(self, labels: "LabelSet", prompt: str | None = None) -> "torch.Tensor | None":
        """[K,C] L2-normalised on the model's device, or None when the labels are baked in."""

    def dense_logits(self, images: "torch.Tensor", label_embeddings: "torch.Tensor | None",
                     autocast_dtype: "torch.dtype | None" = None, return_embeddings: bool = False
                     ) -> "tuple[torch.Tensor, torch.Tensor | None]":
        """[B,3,H,W] in [0,1] -> (logits [B,K,H/s,W/s] fp32, pixel embeddings [B,C,H/s,W/s] or None)."""

    def to(self, device) -> "DenseBackend": ...

    def eval(self) -> "DenseBackend": ...
