"""predict's device decoding (--decode): plain JPEGs decoded in batches on the model's device.

    workers: read the file, probe its header (host.read_for_device); other files decoded there
    -> this process, per batch: the JPEGs decoded and resized on the device in one call
       (segcli.inference.device_decode); a file the device refuses is decoded by a worker after all

The stages after (infer, restore, render, write) are unchanged: the model reads the device's pixels
as it reads the workers' canvases.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from segcli.errors import SegcliError
from segcli.inference.device_decode import DeviceDecoder, device_decoding_works
from segcli.inference.segmenter import Segmenter
from segcli.pipeline.model_step import Item

DECODE_CHOICES = ("auto", "host", "device")


def check_decode(choice: str) -> None:
    if choice not in DECODE_CHOICES:
        raise SegcliError(f"--decode {choice!r}: use auto, host or device")


def decodes_on_device(choice: str, seg: Segmenter) -> bool:
    """--decode host|device|auto for this model: auto decodes on the device on a GPU whose
    torchvision has nvJPEG; device is refused with one line where it cannot run."""
    check_decode(choice)
    if choice == "host" or (choice == "auto" and seg.device.type != "cuda"):
        return False
    if not isinstance(seg.model, torch.nn.Module):
        if choice == "auto":
            return False
        raise SegcliError("--decode device needs a PyTorch model (a checkpoint, clip-dense, ...), not an export")
    why = device_decoding_works(seg.device)
    if why is not None:
        if choice == "auto":
            return False
        raise SegcliError(f"--decode device: this {seg.device.type} device cannot decode JPEGs ({why}); use --decode host")
    return True


class DeviceInputs:
    """The batch step: the device's JPEGs in the batch decoded together; a file the device refuses
    goes to `host_decode` (a worker's full decode), whose failure is the input's."""

    def __init__(self, seg: Segmenter, host_decode: Callable[[Item], Item]):
        self.decoder = DeviceDecoder(seg.device, seg.imgsz, seg.protocol)
        self.host_decode = host_decode
        self.decoded = self.refused = 0  # files decoded on the device, and handed back to the host

    def decode(self, batch: list[Item]) -> list[Item]:
        """Fill in the model pixels of the batch's device JPEGs; returns the batch's items that are
        ready (an input the host could not decode either has `error` set and is left out)."""
        todo = [item for item in batch if item.model_input.jpeg is not None]
        if todo:
            t0 = time.perf_counter()
            got = self.decoder.model_pixels([it.model_input.jpeg for it in todo], [it.model_input.probe for it in todo])
            share = (time.perf_counter() - t0) / len(todo)
            for item, result in zip(todo, got):
                if result is None:
                    self.refused += 1
                    self.host_decode(item)
                    continue
                self.decoded += 1
                got_input = item.model_input
                got_input.pixels, got_input.jpeg, got_input.probe = result[0], None, None
                got_input.seconds += share
        return [item for item in batch if not item.error]
