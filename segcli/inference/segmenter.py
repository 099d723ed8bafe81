"""The inference core's face: `Segmenter.from_pretrained(...).predict(images, labels)`.

A Segmenter holds a loaded model, its device and precision, and how it reads images (a frozen
`InferenceSettings`, resolved once); the batching, windows, region masks and refinement that
predict, eval, videos and the server share live in its `runner` (segcli.inference.runner).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from segcli.errors import SegcliError, check_input_size
from segcli.inference.device import resolve_device, resolve_precision
from segcli.inference.runner import Reading, SegmentRunner
from segcli.inference.settings import InferenceSettings
from segcli.inputs.geometry import Protocol
from segcli.inputs.images import load_image, to_rgb
from segcli.modeling.backend import DenseBackend
from segcli.models.factory import UNTRAINED_WARNING, load_model
from segcli.models.families import DEFAULT_MODEL
from segcli.postprocess.label_map import image_region, restore_label_map
from segcli.vocabulary.labels import LabelSet, parse_labels, prompt_templates


@dataclass
class Prediction:
    """One image's result. `label_map` [H,W] at the image's own size; index k is `labels.names[k]`."""

    label_map: np.ndarray
    labels: LabelSet
    logits: torch.Tensor | None = None  # [K,h,w] at model resolution (input / output_stride), image region
    embeddings: torch.Tensor | None = None  # [C,h,w] pixel embeddings (not normalised), same region


class Segmenter:
    """Open-vocabulary segmentation with any segcli backend (LSeg, training-free CLIP dense, ONNX).

    >>> seg = Segmenter.from_pretrained()  # clip-dense:ViT-B-16, downloaded once and cached
    >>> seg = Segmenter.from_pretrained("model.safetensors", settings=InferenceSettings(window=0))
    >>> [pred] = seg.predict(["photo.jpg"], labels="road,car,sky")
    >>> pred.label_map.shape  # (H, W) of photo.jpg, values in 0..2
    """

    def __init__(self, model: DenseBackend, *, device: str | torch.device = "auto", precision: str = "auto",
                 imgsz: int | None = None, labels: LabelSet | None = None, name: str = "",
                 fingerprint: str = "", untrained: bool = False, settings: InferenceSettings | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.int8 = (precision or "").lower() == "int8"
        if self.int8:
            if not self.model.capabilities.int8:
                raise SegcliError("--precision int8 needs a PyTorch model (a checkpoint, clip-dense, ...), not an export")
            self.model.quantize_int8()
        self.imgsz = self._check_imgsz(imgsz or model.default_imgsz)
        self.default_labels = labels
        self.name = name or model.architecture
        self.fingerprint = fingerprint or f"arch:{model.architecture}"
        self.untrained = untrained
        self.settings = settings or InferenceSettings()
        self.runner = SegmentRunner(self.model, self.device, self.autocast_dtype, self.imgsz,
                                    Reading.resolve(self.model, self.settings), name=self.name)
        self.compiled_batch = 0  # the batch size `compile` compiled for, 0 when not compiled

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                        imgsz: int | None = None, settings: InferenceSettings | None = None,
                        warn: bool = True) -> "Segmenter":
        """Load any --model value (see segcli.models.factory); untrained architectures come with a warning.
        `settings`: how it reads images (checked before the weights load)."""
        dev = resolve_device(device)
        loaded = load_model(model, dev)
        if loaded.spec.untrained and warn:
            warnings.warn(UNTRAINED_WARNING.format(name=model), stacklevel=2)
        return cls(loaded.backend, device=dev, precision=precision, imgsz=imgsz, labels=loaded.labels,
                   name=str(model), fingerprint=loaded.fingerprint, untrained=loaded.spec.untrained, settings=settings)

    # -- how it reads images: one frozen record, resolved against the model ----------------------

    def configure(self, settings: InferenceSettings) -> "Segmenter":
        """Read images as `settings` say from now on (all checked first: a bad value changes
        nothing). The compiled image branch, if any, is kept. Returns self."""
        self.runner = self.runner.with_reading(Reading.resolve(self.model, settings))
        self.settings = settings
        return self

    @property
    def protocol(self) -> Protocol:
        """How images meet the model (segcli.inputs.geometry): one canvas, or sliding windows."""
        return self.runner.reading.protocol

    @property
    def synonyms(self) -> str:
        """How a label's synonyms ("road;street") are scored: "max" (each on its own, the label takes
        its best one: the training-free methods' rule) or "mean" (one averaged embedding: LSeg's)."""
        return self.runner.reading.synonyms

    @property
    def bg_threshold(self) -> float | None:
        """Pixels whose best label is less likely than this (softmax over the scored channels, at
        the method's own temperature) take label 0; None: off."""
        return self.runner.reading.bg_threshold

    @property
    def needs_regions(self) -> bool:
        """The model reads each image's region masks (corrclip)."""
        return self.model.capabilities.needs_regions

    @property
    def precision_name(self) -> str:
        """What the image branch computes in, as run records say it: int8, bfloat16, float16, float32."""
        from segcli.embeddings.format import dtype_name

        return "int8" if self.int8 else dtype_name(self.autocast_dtype or torch.float32)

    # -- speed: decided once, before a run -------------------------------------------------------

    def compile(self, batch_size: int) -> float:
        """Compile the image branch for batches of `batch_size` now (segcli.inference.tuning); the
        seconds it took. On failure (SegcliError) the Segmenter runs as before."""
        from segcli.inference.tuning import compile_image_branch

        self.runner, seconds = compile_image_branch(self.runner, batch_size, self.int8)
        self.compiled_batch = batch_size
        return seconds

    def find_batch_size(self) -> tuple[int, dict]:
        """The batch size this model runs best at here (segcli.inference.tuning); the rates measured."""
        from segcli.inference.tuning import best_batch_size

        return best_batch_size(self.runner)

    # -- labels ----------------------------------------------------------------------------------

    def resolve_labels(self, labels: str | LabelSet | None) -> LabelSet:
        if isinstance(labels, LabelSet):
            return labels
        if labels is None:
            if self.default_labels is None:
                raise SegcliError("no labels given and the model carries none: pass --labels \"road,car,sky\"")
            return self.default_labels
        return parse_labels(labels)

    def label_groups(self, labels: LabelSet) -> np.ndarray | None:
        """[S] label index of each scored channel when synonyms are scored separately ("max" and some
        label has several), else None: the channels are the labels."""
        if self.synonyms != "max" or self.model.baked_labels is not None or all(len(s) == 1 for s in labels.synonyms):
            return None
        return np.repeat(np.arange(len(labels)), [len(s) for s in labels.synonyms])

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor | None:
        """[K,C] normalised, on the model's device (cached per label set and prompt); [S,C], one row
        per synonym, when `label_groups(labels)` says synonyms are scored separately; None when the
        model has its labels baked in (and they are these)."""
        prompt_templates(prompt)  # a template with {} or a named set: checked before any work
        if self.label_groups(labels) is not None:
            labels = LabelSet.of_words([word for syn in labels.synonyms for word in syn])
        return self.model.label_embeddings(labels, prompt or self.model.default_prompt)

    # -- what a run asks of the model --------------------------------------------------------------

    def check_embeddings(self) -> None:
        """One line when this model gives no pixel embeddings (an export; corrclip)."""
        caps = self.model.capabilities
        if not caps.provides_embeddings:
            why = caps.limits or "an ONNX export"
            raise SegcliError(f"this model gives no pixel embeddings ({why}): use another model (a checkpoint, "
                              "clip-dense, naclip, ...)")

    def refiner_for(self, refine: str) -> torch.nn.Module | None:
        """The PAMR module when `refine` asks for it ("pamr"; "auto": for the methods whose published
        numbers use it, as their capabilities say: naclip), else None ("none")."""
        if refine not in ("auto", "pamr", "none"):
            raise SegcliError(f"--refine {refine!r}: use auto, pamr or none")
        if refine == "pamr" or (refine == "auto" and self.model.capabilities.default_refine == "pamr"):
            from segcli.modeling.pamr import PAMR

            return PAMR()
        return None

    def _check_imgsz(self, imgsz: int) -> int:
        fixed = self.model.fixed_imgsz
        if fixed is not None and imgsz != fixed:
            raise SegcliError(f"this exported model takes --imgsz {fixed} only (export again for {imgsz})")
        return check_input_size(imgsz, self.model.input_multiple)

    # -- the Python API ----------------------------------------------------------------------------

    def embed(self, images: Image.Image | np.ndarray | str | os.PathLike | Sequence, batch_size: int = 4) -> list:
        """Pixel embeddings of images, as the model computes them at its output stride: a list of
        `segcli.embeddings.format.PixelEmbeddings` ([C,h,w], the cells covering each image) whose
        `.query(labels)` gives the label map `predict` would, running only the text tower."""
        from segcli.embeddings.format import EmbeddingInfo, PixelEmbeddings

        self.check_embeddings()
        items = images if isinstance(images, (list, tuple)) else [images]
        stride = self.model.output_stride
        out = []
        for start in range(0, len(items), batch_size):
            pil = [_as_pil(x) for x in items[start:start + batch_size]]
            canvases = [self.runner.prepare(im) for im in pil]
            emb = self.runner.embeddings(np.stack([c.pixels for c in canvases]))
            for i, (im, canvas) in enumerate(zip(pil, canvases)):
                region = self.runner.image_region(emb[i], canvas).contiguous()
                info = EmbeddingInfo.of(self, region, stride, (im.height, im.width), canvas.resized_hw)
                out.append(PixelEmbeddings(region, info, self))
        return out

    def predict(self, images: Image.Image | np.ndarray | str | os.PathLike | Sequence, labels: str | LabelSet | None = None,
                prompt: str | None = None, batch_size: int = 4, return_logits: bool = False,
                return_embeddings: bool = False, refine: str = "auto") -> list[Prediction]:
        """Segment images (PIL images, HxWx3 uint8 arrays or paths) with `labels` ("a,b;c", "ade20k", ...).
        `refine` as predict's --refine; returned logits are then the refined ones, at stride 1."""
        label_set = self.resolve_labels(labels)
        refiner = self.refiner_for(refine)
        groups = self.label_groups(label_set)
        text = self.label_embeddings(label_set, prompt)
        items = images if isinstance(images, (list, tuple)) else [images]
        results: list[Prediction] = []
        if return_embeddings:
            self.check_embeddings()
            if self.protocol.sliding:
                raise SegcliError("pixel embeddings come from one canvas: configure(InferenceSettings(window=0)) first")
        runner = self.runner
        for start in range(0, len(items), batch_size):
            pil = [_as_pil(x) for x in items[start:start + batch_size]]
            prepared = [runner.prepare_pixels(im) for im in pil]
            finished, emb = runner.segment_finished(*zip(*prepared), text, batch_size, refiner, groups, return_embeddings)
            for i, (im, (_, resized_hw), (logits_i, valid)) in enumerate(zip(pil, prepared, finished)):
                results.append(Prediction(
                    label_map=restore_label_map(logits_i, valid, (im.height, im.width), groups=groups),
                    labels=label_set,
                    logits=logits_i[:, :math.ceil(valid[0]), :math.ceil(valid[1])].cpu() if return_logits else None,
                    embeddings=image_region(emb[i].cpu(), resized_hw, self.model.output_stride) if emb is not None else None,
                ))
        return results


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise SegcliError("numpy images must be HxWx3 (or HxW) uint8 RGB")
        return to_rgb(Image.fromarray(image))
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    raise SegcliError(f"cannot use {type(image).__name__} as an image")

