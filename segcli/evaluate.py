"""The eval engine: pixel accuracy, mIoU and per-class IoU of a model on a dataset split.

Single scale runs exactly the predict path (`Segmenter.predict`), so a mask written by `segcli
predict` scores the same as here. `--ms-flip` sums logits over LSeg's scales and horizontal flips;
`--window/--stride` tiles large inputs instead of shrinking them to one canvas.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segcli.api import Segmenter
from segcli.data.images import fit_to_canvas
from segcli.data.segmentation import SegmentationData
from segcli.errors import SegcliError, check_input_size
from segcli.labels import LabelSet
from segcli.masks import image_extent, image_region, restore_label_map
from segcli.metrics import ConfusionMatrix

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scale_logits(seg: Segmenter, image: Image.Image, text: torch.Tensor, size: int, flip: bool = False,
                 window: int | None = None, stride: int | None = None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Logits [K,h,w] covering `image` resized to long side `size` (at 1/output_stride), and the
    exact extent of the image in logit pixels. Windows of `window` every `stride` when it is larger."""
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    s = seg.model.output_stride
    if window is None or size <= window:
        canvas = fit_to_canvas(image, size)
        logits, _ = seg.segment_canvases(canvas.pixels[None], text)
        region = seg.image_region(logits[0], canvas)
        valid = image_extent(canvas.resized_hw, s)
    else:
        w, h = image.size
        scale = size / max(w, h)
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        pixels = np.asarray(image.resize((rw, rh), Image.BILINEAR))
        gh, gw = math.ceil(max(rh, window) / s), math.ceil(max(rw, window) / s)
        total = torch.zeros(text.shape[0], gh, gw)
        count = torch.zeros(1, gh, gw)
        for y in _starts(max(rh, window), window, stride, s):
            for x in _starts(max(rw, window), window, stride, s):
                tile = np.zeros((window, window, 3), np.uint8)
                crop = pixels[y:y + window, x:x + window]
                tile[:crop.shape[0], :crop.shape[1]] = crop
                logits, _ = seg.segment_canvases(tile[None], text)
                total[:, y // s:(y + window) // s, x // s:(x + window) // s] += logits[0]
                count[:, y // s:(y + window) // s, x // s:(x + window) // s] += 1
        region = image_region(total / count, (rh, rw), s)
        valid = image_extent((rh, rw), s)
    if flip:
        region = region.flip(-1)
    return region, valid


def _starts(length: int, window: int, stride: int, cell: int) -> list[int]:
    """Window offsets covering `length`; the last one rounded up to a whole logit cell, so every
    cell of the image is covered (an odd offset left the last cell row uncovered)."""
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:
        starts.append(-(-(length - window) // cell) * cell)
    return starts


def label_map(seg: Segmenter, image: Image.Image, text: torch.Tensor, scales=(1.0,), flip: bool = False,
              window: int | None = None, stride: int | None = None) -> np.ndarray:
    """[H,W] label map from logits summed over `scales` (x the model's input size) and flips."""
    m = seg.model.input_multiple
    ref, ref_valid = None, None
    for scale in sorted(scales, key=lambda x: x != 1.0):  # the 1.0 grid is the reference
        for flipped in ((False, True) if flip else (False,)):
            logits, valid = scale_logits(seg, image, text, _round_to(seg.imgsz * scale, m), flipped, window, stride)
            if ref is None:
                ref, ref_valid = logits.clone(), valid
            else:
                ref += F.interpolate(logits[None], size=ref.shape[-2:], mode="bilinear", align_corners=False)[0]
    return restore_label_map(ref, ref_valid, (image.height, image.width))


def evaluate(seg: Segmenter, data: SegmentationData, split: str = "val", labels: LabelSet | None = None,
             batch_size: int = 8, ms_flip: bool = False, window: int | None = None, stride: int | None = None,
             on_image: Callable[[int, int], None] | None = None) -> dict:
    """Metrics over the whole split from one confusion matrix (mmsegmentation's definition)."""
    labels = labels or data.classes
    if len(labels) != len(data.classes):
        raise SegcliError(f"--labels gives {len(labels)} names but {data.name} has {len(data.classes)} classes "
                          "(name every class, in the dataset's order)")
    if window is not None:
        stride = stride or window * 2 // 3
        check_input_size(window, seg.model.input_multiple, "--window")
        check_input_size(stride, seg.model.input_multiple, "--stride")
        if stride > window:
            raise SegcliError(f"--stride {stride} must not exceed --window {window}")
    samples = data.samples(split)
    if not samples:
        raise SegcliError(f"split {split!r} of {data.name} is empty")
    cm = ConfusionMatrix(len(labels))
    text = seg.label_embeddings(labels)
    simple = not ms_flip and window is None
    for start in range(0, len(samples), batch_size):
        chunk = [data.load(split, s) for s in samples[start:start + batch_size]]
        if simple:
            preds = [p.label_map for p in seg.predict([img for img, _ in chunk], labels=labels, batch_size=batch_size)]
        else:
            scales = MS_SCALES if ms_flip else (1.0,)
            preds = [label_map(seg, Image.fromarray(img), text, scales, ms_flip, window, stride) for img, _ in chunk]
        for (_, truth), pred in zip(chunk, preds):
            cm.update(truth, pred)
        if on_image:
            on_image(min(start + batch_size, len(samples)), len(samples))
    result = cm.summary(labels.names)
    result.update({"split": split, "images": len(samples), "dataset": data.name,
                   "ms_flip": ms_flip, "window": window, "stride": stride if window else None})
    return result
