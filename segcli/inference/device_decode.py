"""Plain JPEGs decoded in batches on the model's device and resized there for the model.

On a GPU host the model outruns the host's cores at decoding (docs: performance): nvJPEG through
torchvision's `decode_jpeg(list, device="cuda")` decodes a batch in one call, and the resize to the
model's input (bilinear, antialiased like Pillow's) runs on the same device. Only JPEGs whose headers
`segcli.inputs.jpeg_probe` accepts come here; a file the device decoder still refuses, or decodes to
another size than its header says, is handed back (None) for the host to decode, so every input
gets the host path's errors and nothing is lost. The decoder is a parameter: tests run this same
code on a CPU with torchvision's libjpeg decoder or with stubs that fail on purpose.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from segcli.inputs.geometry import Protocol, model_size, square_first_size
from segcli.inputs.jpeg_probe import JpegProbe

# [encoded JPEG bytes as 1-D uint8 CPU tensors], device -> [3,H,W] uint8 images on the device
DecodeFn = Callable[[list[torch.Tensor], torch.device], Sequence[torch.Tensor]]
CALL_PIXELS = 256_000_000  # pixels per decode call (768 MB of RGB on the device); larger batches are split


def torchvision_decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decoder: nvJPEG on CUDA, libjpeg-turbo on a CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # deprecated in favour of TorchCodec's decode_jpeg, which turns photos by EXIF itself (on a CPU at
    # least; `orient` would turn them twice): not switched before it has run on a GPU (docs: limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """[3,H,W] as stored -> upright, for EXIF orientation 1-8 (as Pillow's exif_transpose turns it)."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1, 2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.rot90(-1, (1, 2))
    if orientation == 7:
        return image.flip(1, 2).transpose(1, 2)
    if orientation == 8:
        return image.rot90(1, (1, 2))
    return image


class DeviceDecoder:
    """JPEG bytes -> the model's pixels on `device`, as `segcli.inference.windows.model_pixels` makes
    them on the host: one canvas [S,S,3] uint8 with the image at its top-left, or for windows the
    resized image [h,w,3]."""

    def __init__(self, device: torch.device, imgsz: int, protocol: Protocol, decode: DecodeFn | None = None):
        self.device, self.imgsz, self.protocol = torch.device(device), imgsz, protocol
        self.decode = decode or torchvision_decode
        self.calls = 0  # decode calls made (a batch is one call unless it fails or is split)

    def model_pixels(self, encoded: Sequence[bytes], probes: Sequence[JpegProbe]
                     ) -> list[tuple[torch.Tensor, tuple[int, int]] | None]:
        """Per JPEG: (its model pixels on the device, the image's size in them), or None where the
        device did not decode it as its header says (the host's to decode)."""
        out: list[tuple[torch.Tensor, tuple[int, int]] | None] = [None] * len(encoded)
        for chunk in self._chunks(probes):
            images = self._decode([encoded[i] for i in chunk])
            for i, image in zip(chunk, images):
                probe = probes[i]
                if (image is None or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8
                        or tuple(image.shape[1:]) != probe.stored_hw):
                    continue  # never trust a native decoder's output shape: the host decodes it
                out[i] = self._fit(orient(image, probe.orientation))
        return out

    def _chunks(self, probes: Sequence[JpegProbe]) -> list[list[int]]:
        chunks, pixels = [[]], 0
        for i, probe in enumerate(probes):
            size = probe.stored_hw[0] * probe.stored_hw[1]
            if chunks[-1] and pixels + size > CALL_PIXELS:
                chunks.append([])
                pixels = 0
            chunks[-1].append(i)
            pixels += size
        return [c for c in chunks if c]

    def _decode(self, encoded: list[bytes]) -> list[torch.Tensor | None]:
        """One batched call; when it fails (one bad file fails the whole call: torchvision returns no
        partial results), one call per file, and the files that still fail are None."""
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        self.calls += 1
        try:
            images = list(self.decode(tensors, self.device))
            if len(images) == len(tensors):
                return images
        except Exception:  # noqa: BLE001 - any decoder failure sends the files to the host, one by one
            pass
        single: list[torch.Tensor | None] = []
        for tensor in tensors:
            self.calls += 1
            try:
                got = list(self.decode([tensor], self.device))
                single.append(got[0] if len(got) == 1 else None)
            except Exception:  # noqa: BLE001
                single.append(None)
        return single

    def _fit(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Upright [3,H,W] uint8 -> (model pixels, resized (h, w)): resized on the device with the
        host's sizes (model_size) and filter (bilinear, antialiased when shrinking, like Pillow's)."""
        h, w = image.shape[1:]
        rw, rh = model_size(w, h, self.imgsz, self.protocol)
        extent = (rh, rw)
        if self.protocol.sliding and self.protocol.square:  # the short-side image; its scores cover the square
            rw, rh = square_first_size(w, h, self.protocol.short_side)
        if (rh, rw) != (h, w):
            image = F.interpolate(image[None].float(), size=(rh, rw), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        pixels = image.permute(1, 2, 0)
        if self.protocol.sliding:
            return pixels.contiguous(), extent
        canvas = torch.zeros((self.imgsz, self.imgsz, 3), dtype=torch.uint8, device=image.device)
        canvas[:rh, :rw] = pixels
        return canvas, (rh, rw)


def device_decoding_works(device: torch.device) -> str | None:
    """None when the device decodes a JPEG here (torchvision built with nvJPEG for this CUDA), else
    why not, in one line."""
    import cv2
    import numpy as np

    data = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()
    try:
        got = torchvision_decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)
    except Exception as exc:  # noqa: BLE001 - whatever the build lacks, said in one line
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None if len(got) == 1 and tuple(got[0].shape) == (3, 16, 16) else "its decoder gave a wrong size"
