"""The machinery under `Segmenter`: model pixels -> logits, in batches, one canvas or sliding
windows, with region masks, refinement and the background rule. predict, eval, videos and the server
run it through `Segmenter.runner` (as segment-anything keeps `predict_torch` under `predict`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from segcli.errors import SegcliError
from segcli.inference.settings import InferenceSettings
from segcli.inference.windows import average_windows
from segcli.inputs.geometry import Canvas, Protocol, fit_to_canvas, model_pixels, resolve_protocol, window_tiles, windows
from segcli.modeling.backend import DenseBackend
from segcli.postprocess.label_map import image_extent, image_region


@dataclass(frozen=True)
class Reading:
    """InferenceSettings resolved against a model: what the runner does (checked, frozen)."""

    protocol: Protocol
    synonyms: str
    bg_threshold: float | None

    @classmethod
    def resolve(cls, model: DenseBackend, settings: InferenceSettings) -> "Reading":
        """The model's own protocol (sliding windows for clip-dense, one canvas otherwise) with the
        settings' overrides; one-line errors for values that cannot work."""
        caps = model.capabilities
        protocol = resolve_protocol(caps.default_protocol, settings.short_side, settings.window, settings.stride,
                                    model.input_multiple)
        fixed = model.fixed_imgsz
        if protocol.sliding and fixed is not None and protocol.window != fixed:
            raise SegcliError(f"this exported model takes {fixed}-pixel inputs: use --window {fixed} (or --window 0)")
        synonyms = settings.synonyms or caps.default_synonyms
        if synonyms not in ("max", "mean"):
            raise SegcliError(f"--synonyms {synonyms!r}: use max or mean")
        threshold = settings.bg_threshold
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise SegcliError(f"--bg-threshold {threshold}: give a probability between 0 and 1, e.g. 0.1")
        return cls(protocol, synonyms, threshold)


class SegmentRunner:
    """Model pixels -> per-image logits on the model's device, under one `Reading`.

    `backend` is what runs the images (the model, or segcli.inference.tuning's compiled wrapper of
    it); `model` is the model itself (its sizes and capabilities)."""

    def __init__(self, model: DenseBackend, device: torch.device, autocast_dtype: torch.dtype | None, imgsz: int,
                 reading: Reading, backend: DenseBackend | None = None, name: str = ""):
        self.model, self.backend = model, backend or model
        self.device, self.autocast_dtype, self.imgsz = device, autocast_dtype, imgsz
        self.reading, self.name = reading, name or model.architecture
        self._input = threading.local()  # the reused input batch on the CPU (see _input_batch)

    def with_reading(self, reading: Reading) -> "SegmentRunner":
        return SegmentRunner(self.model, self.device, self.autocast_dtype, self.imgsz, reading, self.backend, self.name)

    def with_backend(self, backend: DenseBackend) -> "SegmentRunner":
        return SegmentRunner(self.model, self.device, self.autocast_dtype, self.imgsz, self.reading, backend, self.name)

    @property
    def protocol(self) -> Protocol:
        return self.reading.protocol

    @property
    def needs_regions(self) -> bool:
        """The model reads each image's region masks (corrclip): `region_maps` makes them."""
        return self.model.capabilities.needs_regions

    @property
    def logit_stride(self) -> int:
        """Input pixels per cell of `segment_images`' logits: the model's output stride for one
        canvas; 1 for windows (averaged at the image's pixels)."""
        return 1 if self.protocol.sliding else self.model.output_stride

    def prepare(self, image) -> Canvas:
        return fit_to_canvas(image, self.imgsz)

    def prepare_pixels(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """(the model's pixels, the image's size in them) under the protocol: see segment_images."""
        return model_pixels(image, self.imgsz, self.protocol)

    def image_region(self, per_pixel: torch.Tensor, canvas: Canvas) -> torch.Tensor:
        """[X,S/s,S/s] -> [X,h,w]: the part of the model-resolution map that covers the image."""
        return image_region(per_pixel, canvas.resized_hw, self.model.output_stride)

    def threshold_background(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [S,h,w] (channel 0 is label 0's first synonym) -> the same with channel 0 made the
        best wherever no channel's probability (softmax at the method's own temperature:
        `capabilities.probability_scale`; a sigmoid-scored model's own scores) reaches the reading's
        `bg_threshold`. Decided per cell of
        the logits given (pixels of the resized image with windows; the peers decide per pixel of
        the original image)."""
        threshold = self.reading.bg_threshold
        if threshold is None:
            return logits
        caps = self.model.capabilities
        if caps.scores == "sigmoid":  # each label's score is its probability already
            unsure = logits.float().amax(0) < threshold
        else:
            unsure = (logits.float() * caps.probability_scale).softmax(0).amax(0) < threshold
        out = logits.clone()
        out[0] = torch.where(unsure, logits.amax(0) + 1.0, logits[0])
        return out

    def finish_logits(self, logits: torch.Tensor, pixels: np.ndarray, resized_hw: tuple[int, int],
                      refiner: torch.nn.Module | None = None, regions: torch.Tensor | None = None,
                      groups: np.ndarray | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
        """`segment_images` logits [K,h',w'] of one image (at the top-left of `pixels`, the model's
        uint8 input) -> (the logits its label map is restored from, the image's exact extent in
        their cells): refined by `refiner` (PAMR) at the size the image has in `pixels` (stride 1
        then; memory and time do not grow with the photo), then `threshold_background`, then with
        `regions` (`region_maps`) the vote in each region (`groups`: `Segmenter.label_groups`)."""
        import torch.nn.functional as F

        stride = self.logit_stride
        if refiner is not None:
            h, w = resized_hw
            if self.protocol.square and host_pixels(pixels).shape[:2] != (h, w):  # the short-side image: stretched
                import cv2

                pixels = cv2.resize(host_pixels(pixels), (w, h), interpolation=cv2.INTER_LINEAR)
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
        generator = self.model.region_generator
        if generator is None:
            raise SegcliError(f"{self.name} needs a region-mask generator and was loaded without one")
        from segcli.inference.regions import image_regions

        return [image_regions(generator, p, hw, self.device) for p, hw in zip(pixels, resized_hws)]

    @torch.inference_mode()
    def segment_images(self, pixels: Sequence[np.ndarray], label_embeddings: torch.Tensor | None,
                       batch_size: int = 8, protocol: Protocol | None = None,
                       regions: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Images as `prepare_pixels` gives them -> per image logits [K,h',w'] fp32 on the model's
        device, the image at the top-left, one cell per `logit_stride` pixels. One canvas: a batch
        of canvases, [K,S/s,S/s]. Windows: every window of these images, `batch_size` at a time,
        each upsampled to its pixels and averaged where they overlap, [K,h,w].
        `regions`: `region_maps` of these images, cut as they are, for a model that reads them."""
        protocol = protocol or self.protocol
        if regions is None and self.needs_regions:
            raise SegcliError(f"{self.name} reads each image's region masks: pass regions=runner.region_maps(...)")
        if not protocol.sliding:
            stacked = torch.stack(list(regions)) if regions is not None else None
            return list(self.segment_canvases(self._stack(pixels), label_embeddings, on_device=True, regions=stacked)[0])
        pixels = [host_pixels(p) for p in pixels]
        if protocol.square:
            return [self.segment_square(p, label_embeddings, batch_size, protocol) for p in pixels]
        tiled = [window_tiles(p, protocol.window, protocol.stride) for p in pixels]
        owners = [(i, corner) for i, (corners, _) in enumerate(tiled) for corner in corners]
        tiles = np.concatenate([t for _, t in tiled])
        cut_regions = None
        if regions is not None:
            from segcli.inference.regions import region_tiles

            cut_regions = torch.cat([region_tiles(r, corners, protocol.window) for r, (corners, _) in zip(regions, tiled)])
        window_logits = [[] for _ in pixels]
        for start in range(0, len(tiles), batch_size):
            cut = cut_regions[start:start + batch_size] if cut_regions is not None else None
            logits, _ = self.segment_canvases(tiles[start:start + batch_size], label_embeddings, on_device=True,
                                              regions=cut)
            for (i, _), one in zip(owners[start:start + batch_size], logits):
                window_logits[i].append(one)
        return [average_windows(torch.stack(w), corners, p.shape[:2], protocol.window)
                for w, (corners, _), p in zip(window_logits, tiled, pixels)]

    def segment_square(self, pixels: np.ndarray, label_embeddings: torch.Tensor | None, batch_size: int,
                       protocol: Protocol) -> torch.Tensor:
        """CAT-Seg's inference_sliding_window on one short-side image [h,w,3] uint8 -> [K,N,N]: the
        image stretched in float to N x N (N the protocol's short side), its windows (zero-padded
        where N is below the window) in batches, their scores averaged, then with `global_view` the
        mean with the whole image's (resized in float to one window, upsampled)."""
        import torch.nn.functional as F

        side, window = protocol.short_side, protocol.window
        image = self._input_batch(pixels[None])
        stretched = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
        if side < window:
            stretched = F.pad(stretched, (0, window - side, 0, window - side))
        corners = windows((side, side), window, protocol.stride)
        crops = torch.cat([stretched[..., y:y + window, x:x + window] for y, x in corners])
        scores = torch.cat([self.backend.dense_logits(crops[i:i + batch_size], label_embeddings, self.autocast_dtype)[0]
                            for i in range(0, len(crops), batch_size)])
        averaged = average_windows(scores, corners, (side, side), window)
        if not protocol.global_view:
            return averaged
        small = F.interpolate(image, size=(window, window), mode="bilinear", align_corners=False)
        return blend_global(averaged, self.backend.dense_logits(small, label_embeddings, self.autocast_dtype)[0][0])

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

    @torch.inference_mode()
    def segment_canvases(self, pixels: np.ndarray | torch.Tensor, label_embeddings: torch.Tensor | None,
                         return_embeddings: bool = False, on_device: bool = False,
                         regions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 canvases [B,S,S,3] -> logits [B,K,S/s,S/s] fp32 on the CPU, or left on the model's
        device with `on_device` (and embeddings [B,C,S/s,S/s]). uint8 travels (from pinned memory on
        CUDA); the conversion to float happens on the device. `regions` [B,S,S]: their region ids."""
        extra = {"regions": regions} if regions is not None else {}
        logits, emb = self.backend.dense_logits(self._input_batch(pixels), label_embeddings, self.autocast_dtype,
                                                return_embeddings, **extra)
        if on_device:
            return logits, emb
        return logits.cpu(), (emb.cpu() if emb is not None else None)

    @torch.inference_mode()
    def embeddings(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 canvases [B,S,S,3] -> pixel embeddings [B,C,S/s,S/s] (fp32 values of the compute dtype)."""
        batch = self._input_batch(pixels)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            emb = self.model.pixel_embeddings(batch)
        return emb.float().cpu()

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
        buffer = getattr(self._input, "batch", None)  # a thread-local: absent in a thread's first call
        if buffer is None or buffer.shape != shape or buffer.device != self.device:
            buffer = self._input.batch = torch.empty(shape, device=self.device)
        return buffer.copy_(batch.permute(0, 3, 1, 2)).div_(255.0)


def blend_global(windows: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The windows' average [K,h,w] and the global view's scores [K,S,S] -> their mean, the global
    view upsampled (bilinear) to the image: CAT-Seg's `(outputs + global_output) / 2`."""
    import torch.nn.functional as F

    up = F.interpolate(whole[None].float(), size=windows.shape[-2:], mode="bilinear", align_corners=False)[0]
    return (windows + up) / 2.0


def host_pixels(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Model pixels as a host array (those decoded on the device copied back: a few hundred kB)."""
    return pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels

