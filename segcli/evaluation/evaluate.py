"""The eval engine: pixel accuracy, mIoU and per-class IoU of a model on a dataset split.

Single scale runs exactly the predict path (`Segmenter.predict`), so a mask written by `segcli
predict` scores the same as here. `--ms-flip` sums logits over LSeg's scales and horizontal flips;
`--short-side/--window/--stride` set the protocol (segcli.inference.windows), as predict's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segcli.datasets.segmentation import SegmentationData
from segcli.errors import SegcliError
from segcli.evaluation.metrics import ConfusionMatrix
from segcli.inference.segmenter import Segmenter
from segcli.inputs.geometry import model_pixels
from segcli.postprocess.label_map import image_extent, image_region, restore_label_map
from segcli.vocabulary.labels import LabelSet

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scale_logits(seg: Segmenter, image: Image.Image, text: torch.Tensor, scale: float = 1.0,
                 flip: bool = False) -> tuple[torch.Tensor, tuple[float, float]]:
    """Logits [K,h,w] on the host covering `image` under the Segmenter's protocol at `scale` (the
    canvas, or the short side, times `scale`), and the exact extent of the image in logit cells."""
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    protocol = seg.protocol
    if scale != 1.0 and protocol.sliding and protocol.short_side:
        protocol = replace(protocol, short_side=max(1, round(protocol.short_side * scale)))
    pixels, resized_hw = model_pixels(image, _round_to(seg.imgsz * scale, seg.model.input_multiple), protocol)
    [logits] = seg.runner.segment_images([pixels], text, protocol=protocol)
    s = seg.runner.logit_stride
    region = image_region(logits, resized_hw, s).cpu()
    if flip:
        region = region.flip(-1)
    return region, image_extent(resized_hw, s)


def label_map(seg: Segmenter, image: Image.Image, text: torch.Tensor, scales=(1.0,), flip: bool = False,
              groups: np.ndarray | None = None) -> np.ndarray:
    """[H,W] label map from logits summed over `scales` (x the model's input size) and flips."""
    ref, ref_valid = None, None
    for scale in sorted(scales, key=lambda x: x != 1.0):  # the 1.0 grid is the reference
        for flipped in ((False, True) if flip else (False,)):
            logits, valid = scale_logits(seg, image, text, scale, flipped)
            if ref is None:
                ref, ref_valid = logits.clone(), valid
            else:
                ref += F.interpolate(logits[None], size=ref.shape[-2:], mode="bilinear", align_corners=False)[0]
    return restore_label_map(seg.runner.threshold_background(ref), ref_valid, (image.height, image.width), groups=groups)


def evaluate(seg: Segmenter, data: SegmentationData, split: str = "val", labels: LabelSet | None = None,
             batch_size: int = 8, ms_flip: bool = False, prompt: str | None = None, refine: str = "auto",
             on_image: Callable[[int, int], None] | None = None) -> dict:
    """Metrics over the whole split from one confusion matrix (mmsegmentation's definition), under
    the Segmenter's protocol (`seg.protocol`: one canvas or sliding windows). `refine` as
    predict's (not with `ms_flip`, whose logits are summed at model resolution)."""
    refines = seg.refiner_for(refine) is not None and not ms_flip  # --ms-flip sums logits at model resolution
    if ms_flip and refine == "pamr":
        raise SegcliError("--refine pamr does not combine with --ms-flip")
    if ms_flip and seg.needs_regions:
        raise SegcliError("--ms-flip sums logits over scales; corrclip votes in each photo's regions: evaluate it without")
    labels = labels or data.classes
    if len(labels) != len(data.classes):
        raise SegcliError(f"--labels gives {len(labels)} names but {data.name} has {len(data.classes)} classes "
                          "(name every class, in the dataset's order)")
    samples = data.samples(split)
    if not samples:
        raise SegcliError(f"split {split!r} of {data.name} is empty")
    cm = ConfusionMatrix(len(labels))
    text = seg.label_embeddings(labels, prompt)
    for start in range(0, len(samples), batch_size):
        chunk = [data.load(split, s) for s in samples[start:start + batch_size]]
        if not ms_flip:
            preds = [p.label_map for p in seg.predict([img for img, _ in chunk], labels=labels, prompt=prompt,
                                                        batch_size=batch_size, refine=refine)]
        else:
            preds = [label_map(seg, Image.fromarray(img), text, MS_SCALES, True, seg.label_groups(labels)) for img, _ in chunk]
        for (_, truth), pred in zip(chunk, preds):
            cm.update(truth, pred)
        if on_image:
            on_image(min(start + batch_size, len(samples)), len(samples))
    result = cm.summary(labels.names)
    result.update({"split": split, "images": len(samples), "dataset": data.name,
                   "ms_flip": ms_flip, "prompt": prompt, "synonyms": seg.synonyms, "bg_threshold": seg.bg_threshold,
                   "refine": "pamr" if refines else "none", "protocol": seg.protocol.describe(),
                   "window": seg.protocol.window, "stride": seg.protocol.stride, "short_side": seg.protocol.short_side})
    return result
