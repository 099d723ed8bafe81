"""Post-processing on the model's device: restore the label map, color, blend and JPEG-encode there.

On a GPU host the model is fast and the host's work per photo decides throughput; this path moves
the full-size work to the device that already holds the logits: the label map is restored there
(bilinear upsampling of the candidate labels + argmax, `masks.restore_label_map_torch`), the photo
for the overlay is decoded there (nvJPEG through torchvision on CUDA), colored and blended there,
and the overlay is JPEG-encoded there. The host copies the label map back (pinned memory), encodes
the PNGs and writes files. It is plain torch, so the same code runs on the CPU in tests and gives
the host path's label maps.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from segcli.inputs.images import ImageDecodeError, decode_full_bgr
from segcli.pipeline import host
from segcli.pipeline.host import HostPlan, InputFailure
from segcli.postprocess.label_map import mask_dtype, restore_label_map_torch
from segcli.postprocess.render import draw_legend, legend_corner


def _failed(exc: Exception) -> Future:
    fut: Future = Future()
    fut.set_exception(exc)
    return fut


class DevicePostprocess:
    """Per run: the label colors on the device, and the device work for one image at a time."""

    def __init__(self, plan: HostPlan, device: torch.device, groups: np.ndarray | None = None):
        self.plan, self.device, self.groups = plan, device, groups
        self.palette = torch.from_numpy(plan.palette).to(device)  # [K,3] uint8 RGB
        self.dtype = torch.uint8 if mask_dtype(len(plan.labels)) == np.uint8 else torch.int32
        self._pinned: torch.Tensor | None = None

    def finish(self, job: host.FinishJob, writers: ThreadPoolExecutor) -> Future:
        """restore (+ the overlay) on the device, here; PNGs and writes on a host thread."""
        t0 = time.perf_counter()
        mask_on_device = self.label_map(job.logits, job.valid_hw, job.full_hw)
        mask, counts = self.to_host(mask_on_device), self.histogram(mask_on_device)
        made = {}
        if "overlay" in self.plan.kinds:
            try:
                data = host.reread(job.source.path, job.stamp)
                made["overlay"] = self.overlay_jpeg(data, mask_on_device, host.present_labels(counts)[1])
            except host.InputFailure as exc:
                return _failed(exc)
        seconds = job.seconds + time.perf_counter() - t0
        return writers.submit(host.complete, job.source, mask, counts, self.plan, seconds, None, {**(job.made or {}), **made})

    def label_map(self, logits: torch.Tensor, valid_hw: tuple[float, float], full_hw: tuple[int, int]) -> torch.Tensor:
        """Logits [K,h,w] on the device -> label map [H,W] on the device."""
        return restore_label_map_torch(logits, valid_hw, full_hw, as_tensor=True, groups=self.groups).to(self.dtype)

    def histogram(self, mask: torch.Tensor) -> np.ndarray:
        """Pixels per label of a label map on the device, [K] int64 on the host."""
        return torch.bincount(mask.flatten().long(), minlength=len(self.plan.labels)).cpu().numpy()

    def to_host(self, mask: torch.Tensor) -> np.ndarray:
        """The label map as a host array, copied through a pinned buffer kept for the run on CUDA
        (allocating pinned memory per photo would cost more than the copy)."""
        if not mask.is_cuda:
            array = mask.cpu().numpy()
        else:
            if self._pinned is None or self._pinned.numel() < mask.numel():
                self._pinned = torch.empty(mask.numel(), dtype=mask.dtype, pin_memory=True)
            staged = self._pinned[:mask.numel()].view(mask.shape)
            staged.copy_(mask)
            array = staged.numpy().copy()  # the buffer is reused for the next photo
        return array if array.dtype == np.uint8 else array.astype(np.uint16)

    def photo(self, data: bytes, full_hw: tuple[int, int]) -> torch.Tensor:
        """The upright full-size photo [3,H,W] uint8 RGB from the file's bytes, on the device: JPEGs
        decoded there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if data[:3] == b"\xff\xd8\xff":
            try:
                photo = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                    device=self.device, apply_exif_orientation=True)
                if tuple(photo.shape[1:]) == tuple(full_hw):
                    return photo
            except RuntimeError:  # a JPEG flavour the device decoder does not take (CMYK, ...): the host's
                pass
        try:
            bgr = decode_full_bgr(data, self.plan.max_pixels)
        except ImageDecodeError as exc:
            raise InputFailure(str(exc)) from None
        return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).to(self.device)

    def overlay_jpeg(self, data: bytes, mask: torch.Tensor, present: list[int], quality: int = 90) -> bytes:
        """The overlay of one photo (the file's bytes), blended and encoded on the device; the
        legend's corner is drawn on the host (a few kB)."""
        from torchvision.io import encode_jpeg

        photo = self.photo(data, tuple(mask.shape))
        color = self.palette[mask.long()].permute(2, 0, 1)  # [3,H,W]
        alpha = self.plan.alpha
        blended = (photo.float() * (1.0 - alpha) + color.float() * alpha).round_().clamp_(0, 255).to(torch.uint8)
        legend = [(self.plan.labels.names[k], self.plan.labels.colors[k]) for k in present]
        if legend:
            h, w = blended.shape[1:]
            corner_h, corner_w = legend_corner(h, w, legend)
            corner = np.ascontiguousarray(blended[:, :corner_h, :corner_w].permute(1, 2, 0).cpu().numpy())
            draw_legend(corner, legend, bgr=False, full_hw=(h, w))
            blended[:, :corner_h, :corner_w] = torch.from_numpy(corner).permute(2, 0, 1).to(self.device)
        return encode_jpeg(blended, quality=quality).cpu().numpy().tobytes()

