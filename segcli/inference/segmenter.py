"""The inference core: `Segmenter.from_pretrained(...).predict(images, labels)`, and the stages that
predict, eval, videos and the server share (prepare_pixels -> segment_images -> finish_logits)."""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from segcli.data.images import Canvas, fit_to_canvas, load_image, to_rgb
from segcli.data.labels import LabelSet, parse_labels, prompt_templates
from segcli.errors import SegcliError, check_input_size
from segcli.inference.device import resolve_device, resolve_precision
from segcli.inference.windows import Protocol, average_windows, model_pixels, resolve_protocol, window_tiles
from segcli.models.backend import DenseBackend
from segcli.models.factory import UNTRAINED_WARNING, load_model
from segcli.models.families import DEFAULT_MODEL
from segcli.postprocess.label_map import image_extent, image_region, restore_label_map


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
    >>> seg = Segmenter.from_pretrained("model.safetensors")
    >>> [pred] = seg.predict(["photo.jpg"], labels="road,car,sky")
    >>> pred.label_map.shape  # (H, W) of photo.jpg, values in 0..2
    """

    def __init__(self, model: DenseBackend, *, device: str | torch.device = "auto", precision: str = "auto",
                 imgsz: int | None = None, labels: LabelSet | None = None, name: str = "",
                 fingerprint: str = "", untrained: bool = False):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.int8 = (precision or "").lower() == "int8"
        if self.int8:
            if not hasattr(self.model, "quantize_int8"):
                raise SegcliError("--precision int8 needs a PyTorch model (a checkpoint, clip-dense, ...), not an export")
            self.model.quantize_int8()
        self.imgsz = self._check_imgsz(imgsz or model.default_imgsz)
        self.default_labels = labels
        self.name = name or model.architecture
        self.fingerprint = fingerprint or f"arch:{model.architecture}"
        self.untrained = untrained
        self._input = threading.local()  # the reused input batch on the CPU (see segment_canvases)
        self.protocol = self.use_protocol()
        self.synonyms = self.use_synonyms()
        self.bg_threshold: float | None = None
        self.compiled_batch = 0  # use_compile's batch size (inputs are padded to it), 0 when not compiled

    def use_compile(self, batch_size: int) -> float:
        """Compile the image branch for batches of `batch_size` now (segcli.inference.tuning); the seconds it took."""
        from segcli.inference.tuning import compile_image_branch

        return compile_image_branch(self, batch_size)

    def find_batch_size(self) -> tuple[int, dict]:
        """The batch size this model runs best at here (segcli.inference.tuning); the rates measured."""
        from segcli.inference.tuning import best_batch_size

        return best_batch_size(self)

    @property
    def needs_regions(self) -> bool:
        """The model reads each image's region masks (corrclip): `region_maps` makes them."""
        return getattr(self.model, "needs_regions", False)

    def check_embeddings(self) -> None:
        """One line when this model gives no pixel embeddings (an export; corrclip)."""
        if not self.model.provides_embeddings:
            why = getattr(self.model, "limits", None) or "an ONNX export"
            raise SegcliError(f"this model gives no pixel embeddings ({why}): use another model (a checkpoint, "
                              "clip-dense, naclip, ...)")

    @property
    def precision_name(self) -> str:
        """What the image branch computes in, as run records say it: int8, bfloat16, float16, float32."""
        from segcli.embeddings.format import dtype_name

        return "int8" if self.int8 else dtype_name(self.autocast_dtype or torch.float32)

    def use_bg_threshold(self, threshold: float | None) -> None:
        """Pixels whose best label is less likely than `threshold` (softmax over the scored channels,
        at the method's own temperature for clip-dense, as ClearCLIP/NACLIP's prob_thd; at the
        model's logit scale otherwise) take label 0: put the background class first. None: off."""
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise SegcliError(f"--bg-threshold {threshold}: give a probability between 0 and 1, e.g. 0.1")
        self.bg_threshold = threshold

    def threshold_background(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [S,h,w] (channel 0 is label 0's first synonym) -> the same with channel 0 made the
        best wherever no channel's probability reaches `bg_threshold`. Decided per cell of the
        logits given (pixels of the resized image with windows; the peers decide per pixel of the
        original image)."""
        if self.bg_threshold is None:
            return logits
        scale = getattr(self.model, "probability_scale", 1.0)
        unsure = (logits.float() * scale).softmax(0).amax(0) < self.bg_threshold
        out = logits.clone()
        out[0] = torch.where(unsure, logits.amax(0) + 1.0, logits[0])
        return out

    def use_synonyms(self, rule: str | None = None) -> str:
        """How a label's synonyms ("road;street") are scored: "max" (each on its own, the label takes
        its best one: the training-free methods' rule and clip-dense's default) or "mean" (one
        averaged embedding: LSeg's default). None: the model's default."""
        rule = rule or getattr(self.model, "default_synonyms", "mean")
        if rule not in ("max", "mean"):
            raise SegcliError(f"--synonyms {rule!r}: use max or mean")
        self.synonyms = rule
        return rule

    def label_groups(self, labels: LabelSet) -> np.ndarray | None:
        """[S] label index of each scored channel when synonyms are scored separately ("max" and some
        label has several), else None: the channels are the labels."""
        if self.synonyms != "max" or self.model.baked_labels is not None or all(len(s) == 1 for s in labels.synonyms):
            return None
        return np.repeat(np.arange(len(labels)), [len(s) for s in labels.synonyms])

    def use_protocol(self, short_side: int | None = None, window: int | None = None, stride: int | None = None) -> Protocol:
        """Set how images meet the model (segcli.inference.windows): the model's own protocol (sliding windows
        over a short side for clip-dense, one canvas otherwise) with these overrides; --window 0 is
        one canvas of `imgsz`."""
        protocol = resolve_protocol(getattr(self.model, "default_protocol", None), short_side, window, stride,
                                    self.model.input_multiple)
        fixed = self.model.fixed_imgsz
        if protocol.sliding and fixed is not None and protocol.window != fixed:
            raise SegcliError(f"this exported model takes {fixed}-pixel inputs: use --window {fixed} (or --window 0)")
        self.protocol = protocol
        return protocol

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, device: str = "auto", precision: str = "auto",
                        imgsz: int | None = None, warn: bool = True) -> "Segmenter":
        """Load any --model value (see segcli.models.factory); untrained architectures come with a warning."""
        dev = resolve_device(device)
        loaded = load_model(model, dev)
        if loaded.spec.untrained and warn:
            warnings.warn(UNTRAINED_WARNING.format(name=model), stacklevel=2)
        return cls(loaded.backend, device=dev, precision=precision, imgsz=imgsz, labels=loaded.labels,
                   name=str(model), fingerprint=loaded.fingerprint, untrained=loaded.spec.untrained)

    def _check_imgsz(self, imgsz: int) -> int:
        fixed = self.model.fixed_imgsz
        if fixed is not None and imgsz != fixed:
            raise SegcliError(f"this exported model takes --imgsz {fixed} only (export again for {imgsz})")
        return check_input_size(imgsz, self.model.input_multiple)

    def resolve_labels(self, labels: str | LabelSet | None) -> LabelSet:
        if isinstance(labels, LabelSet):
            return labels
        if labels is None:
            if self.default_labels is None:
                raise SegcliError("no labels given and the model carries none: pass --labels \"road,car,sky\"")
            return self.default_labels
        return parse_labels(labels)

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor | None:
        """[K,C] normalised, on the model's device (cached per label set and prompt); [S,C], one row
        per synonym, when `label_groups(labels)` says synonyms are scored separately; None when the
        model has its labels baked in (and they are these)."""
        prompt_templates(prompt)  # a template with {} or a named set: checked before any work
        if self.label_groups(labels) is not None:
            labels = LabelSet.of_words([word for syn in labels.synonyms for word in syn])
        return self.model.label_embeddings(labels, prompt or self.model.default_prompt)

    def prepare(self, image: Image.Image) -> Canvas:
        return fit_to_canvas(image, self.imgsz)

    def refiner_for(self, refine: str) -> torch.nn.Module | None:
        """The PAMR module when `refine` asks for it ("pamr"; "auto": for the methods whose published
        numbers use it, naclip), else None ("none")."""
        if refine not in ("auto", "pamr", "none"):
            raise SegcliError(f"--refine {refine!r}: use auto, pamr or none")
        method = getattr(getattr(self.model, "cfg", None), "method", None)
        if refine == "pamr" or (refine == "auto" and method == "naclip"):
            from segcli.modeling.pamr import PAMR

            return PAMR()
        return None

    def finish_logits(self, logits: torch.Tensor, pixels: np.ndarray, resized_hw: tuple[int, int],
                      refiner: torch.nn.Module | None = None, regions: torch.Tensor | None = None,
                      groups: np.ndarray | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
        """`segment_images` logits [K,h',w'] of one image (at the top-left of `pixels`, the model's
        uint8 input) -> (the logits its label map is restored from, the image's exact extent in
        their cells): refined by `refiner` (PAMR) at the size the image has in `pixels` (stride 1
        then; memory and time do not grow with the photo), then `threshold_background`, then with
        `regions` (`region_maps`) the vote in each region (`groups`: `label_groups`). The one place
        predict, the API, eval, videos and the server finish an image's logits."""
        import torch.nn.functional as F

        stride = self.logit_stride
        if refiner is not None:
            h, w = resized_hw
            cells = logits[:, :-(-h // stride), :-(-w // stride)].float()
            # the same pixel-centre mapping as the label map's restoration (align_corners=False)
            up = cells[None] if stride == 1 else F.interpolate(cells[None], scale_factor=stride, mode="bilinear",
                                                               align_corners=False)[:, :, :h, :w]
            image = torch.from_numpy(np.ascontiguousarray(pixels[:h, :w])).to(logits.device).permute(2, 0, 1)
            logits, stride = refiner(image[None].float().div_(255.0), up)[0], 1
        logits = self.threshold_background(logits)
        if regions is not None:
            from segcli.inference.regions import vote_in_regions

            logits = vote_in_regions(logits, regions, resized_hw, groups)
        return logits, image_extent(resized_hw, stride)

    @torch.inference_mode()
    def region_maps(self, pixels: Sequence[np.ndarray], resized_hws: Sequence[tuple[int, int]]
                    ) -> list[torch.Tensor] | None:
        """Per image, its pixels' region ids [H,W] int64 on the model's device, for a model that
        reads them (corrclip: segcli.modeling.regions makes them); None for every other model."""
        if not self.needs_regions:
            return None
        generator = getattr(self.model, "region_generator", None)
        if generator is None:
            raise SegcliError(f"{self.name} needs a region-mask generator and was loaded without one")
        from segcli.inference.regions import image_regions

        return [image_regions(generator, p, hw, self.device) for p, hw in zip(pixels, resized_hws)]

    def prepare_pixels(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """(the model's pixels, the image's size in them) under the protocol: see segment_images."""
        return model_pixels(image, self.imgsz, self.protocol)

    @property
    def logit_stride(self) -> int:
        """Input pixels per cell of `segment_images`' logits: the model's output stride for one
        canvas; 1 for windows (averaged at the image's pixels)."""
        return 1 if self.protocol.sliding else self.model.output_stride

    @torch.inference_mode()
    def segment_images(self, pixels: Sequence[np.ndarray], label_embeddings: torch.Tensor | None,
                       batch_size: int = 8, protocol: Protocol | None = None,
                       regions: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Images as `prepare_pixels` gives them -> per image logits [K,h',w'] fp32 on the model's
        device, the image at the top-left, one cell per `logit_stride` pixels. One canvas: a batch
        of canvases, [K,S/s,S/s]. Windows: every window of these images, `batch_size` at a time,
        each upsampled to its pixels and averaged where they overlap, [K,h,w] (segcli.inference.windows).
        `regions`: `region_maps` of these images, cut as they are, for a model that reads them."""
        protocol = protocol or self.protocol
        if regions is None and self.needs_regions:
            raise SegcliError(f"{self.name} reads each image's region masks: pass regions=seg.region_maps(...)")
        if not protocol.sliding:
            stacked = torch.stack(list(regions)) if regions is not None else None
            return list(self.segment_canvases(self._stack(pixels), label_embeddings, on_device=True, regions=stacked)[0])
        pixels = [host_pixels(p) for p in pixels]
        tiled = [window_tiles(p, protocol.window, protocol.stride) for p in pixels]
        owners = [(i, corner) for i, (corners, _) in enumerate(tiled) for corner in corners]
        tiles = np.concatenate([t for _, t in tiled])
        region_tiles_ = None
        if regions is not None:
            from segcli.inference.regions import region_tiles

            region_tiles_ = torch.cat([region_tiles(r, corners, protocol.window) for r, (corners, _) in zip(regions, tiled)])
        window_logits = [[] for _ in pixels]
        for start in range(0, len(tiles), batch_size):
            cut = region_tiles_[start:start + batch_size] if region_tiles_ is not None else None
            logits, _ = self.segment_canvases(tiles[start:start + batch_size], label_embeddings, on_device=True,
                                              regions=cut)
            for (i, _), one in zip(owners[start:start + batch_size], logits):
                window_logits[i].append(one)
        return [average_windows(torch.stack(w), corners, p.shape[:2], protocol.window)
                for w, (corners, _), p in zip(window_logits, tiled, pixels)]

    @torch.inference_mode()
    def segment_finished(self, pixels: Sequence[np.ndarray | torch.Tensor], resized_hws: Sequence[tuple[int, int]],
                         label_embeddings: torch.Tensor | None, batch_size: int = 8,
                         refiner: torch.nn.Module | None = None, groups: np.ndarray | None = None,
                         return_embeddings: bool = False, between: Callable | None = None
                         ) -> tuple[list[tuple[torch.Tensor, tuple[float, float]]], torch.Tensor | None]:
        """Model pixels (`prepare_pixels`) -> (per image `finish_logits`' (logits, extent), and with
        `return_embeddings` the canvases' embeddings [B,C,S/s,S/s]): `segment_images` with the region
        masks of a model that reads them, then `finish_logits`. `between(i, logits)` may change an
        image's logits before they are finished (videos' smoothing). What predict, the API, videos
        and the server run."""
        if return_embeddings:  # one canvas each, no regions (such models store no embeddings)
            logits, emb = self.segment_canvases(self._stack(pixels), label_embeddings, True, on_device=True)
            regions = None
        else:
            regions = self.region_maps(pixels, resized_hws)
            logits, emb = self.segment_images(pixels, label_embeddings, batch_size, regions=regions), None
        finished = []
        for i, (logits_i, pixels_i, hw) in enumerate(zip(logits, pixels, resized_hws)):
            logits_i = between(i, logits_i) if between is not None else logits_i
            finished.append(self.finish_logits(logits_i, pixels_i, hw, refiner, regions[i] if regions else None, groups))
        return finished, emb

    def image_region(self, per_pixel: torch.Tensor, canvas: Canvas) -> torch.Tensor:
        """[X,S/s,S/s] -> [X,h,w]: the part of the model-resolution map that covers the image."""
        return image_region(per_pixel, canvas.resized_hw, self.model.output_stride)

    @torch.inference_mode()
    def segment_canvases(self, pixels: np.ndarray, label_embeddings: torch.Tensor | None,
                         return_embeddings: bool = False, on_device: bool = False,
                         regions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 canvases [B,S,S,3] -> logits [B,K,S/s,S/s] fp32 on the CPU, or left on the model's
        device with `on_device` (and embeddings [B,C,S/s,S/s]). uint8 travels (from pinned memory on
        CUDA); the conversion to float happens on the device. `regions` [B,S,S]: their region ids."""
        extra = {"regions": regions} if regions is not None else {}
        count = len(pixels)
        if self.compiled_batch and count < self.compiled_batch:  # the compiled shape: pad, then drop the padding
            if isinstance(pixels, torch.Tensor):
                pixels = torch.cat([pixels, pixels.new_zeros((self.compiled_batch - count, *pixels.shape[1:]))])
            else:
                pixels = np.concatenate([pixels, np.zeros((self.compiled_batch - count, *pixels.shape[1:]), pixels.dtype)])
        logits, emb = self.model.dense_logits(self._input_batch(pixels), label_embeddings, self.autocast_dtype,
                                              return_embeddings, **extra)
        logits, emb = logits[:count], (emb[:count] if emb is not None else None)
        if on_device:
            return logits, emb
        return logits.cpu(), (emb.cpu() if emb is not None else None)

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
            canvases = [self.prepare(im) for im in pil]
            emb = self._embeddings(np.stack([c.pixels for c in canvases]))
            for i, (im, canvas) in enumerate(zip(pil, canvases)):
                region = self.image_region(emb[i], canvas).contiguous()
                info = EmbeddingInfo.of(self, region, stride, (im.height, im.width), canvas.resized_hw)
                out.append(PixelEmbeddings(region, info, self))
        return out

    def _stack(self, pixels: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
        """Canvases [S,S,3] -> [B,S,S,3]: on the model's device when some are there already (decoded
        there: segcli.inference.device_decode), else a host array."""
        if not any(isinstance(p, torch.Tensor) for p in pixels):
            return np.stack(pixels)
        return torch.stack([torch.as_tensor(p).to(self.device) for p in pixels])

    def _input_batch(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 canvases [B,S,S,3] (host array, or tensor on the device) -> [B,3,S,S] float in [0,1]
        on the model's device."""
        batch = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        if self.device.type == "cuda":
            if not batch.is_cuda:
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            # reorder the bytes, then convert: a strided float conversion costs several times more
            return batch.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        # one pass into a buffer kept between batches (per thread): a fresh one costs page faults
        shape = (batch.shape[0], 3, batch.shape[1], batch.shape[2])
        buffer = getattr(self._input, "batch", None)
        if buffer is None or buffer.shape != shape or buffer.device != self.device:
            buffer = self._input.batch = torch.empty(shape, device=self.device)
        return buffer.copy_(batch.permute(0, 3, 1, 2)).div_(255.0)

    @torch.inference_mode()
    def _embeddings(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 canvases [B,S,S,3] -> pixel embeddings [B,C,S/s,S/s] (fp32 values of the compute dtype)."""
        batch = self._input_batch(pixels)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            emb = self.model.pixel_embeddings(batch)
        return emb.float().cpu()

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
                raise SegcliError("pixel embeddings come from one canvas: use_protocol(window=0) first")
        for start in range(0, len(items), batch_size):
            pil = [_as_pil(x) for x in items[start:start + batch_size]]
            prepared = [self.prepare_pixels(im) for im in pil]
            finished, emb = self.segment_finished(*zip(*prepared), text, batch_size, refiner, groups, return_embeddings)
            for i, (im, (pixels, resized_hw), (logits_i, valid)) in enumerate(zip(pil, prepared, finished)):
                results.append(Prediction(
                    label_map=restore_label_map(logits_i, valid, (im.height, im.width), groups=groups),
                    labels=label_set,
                    logits=logits_i[:, :math.ceil(valid[0]), :math.ceil(valid[1])].cpu() if return_logits else None,
                    embeddings=image_region(emb[i].cpu(), resized_hw, self.model.output_stride) if emb is not None else None,
                ))
        return results


def host_pixels(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Model pixels as a host array (those decoded on the device copied back: a few hundred kB)."""
    return pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels


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

