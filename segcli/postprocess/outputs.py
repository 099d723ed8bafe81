"""The output kinds of `segcli predict`, as one table: a new kind is one entry here.

Each kind names its file suffix, whether it needs the full-size decoded photo (decoding can skip
detail otherwise), and how its bytes are produced from a label map — or that the model's process
makes them (the pixel embeddings, see `segcli.embeddings.format`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from segcli.postprocess.render import (
    colorize,
    colorize_bgr,
    encode_jpeg_bgr,
    encode_png,
    overlay_bgr,
    overlay_from_mask,
    palette_png,
    png_from_rows,
    scratch,
)
from segcli.vocabulary.labels import LabelSet


@dataclass
class RenderInput:
    """What every producer may use for one image. `mask` [H,W] at the photo's size; `photo` [H,W,3]
    BGR, present only when some requested kind needs it; `present` label indices, most pixels first.
    Intermediate results are computed once and shared between kinds."""

    mask: np.ndarray
    labels: LabelSet
    palette: np.ndarray  # [K,3] uint8 RGB
    present: list[int]
    alpha: float
    photo: np.ndarray | None = None  # the overlay is blended into it
    lut: np.ndarray | None = None  # [1,256,3] BGR lookup table for 8-bit masks (see render.color_lut)
    blend: np.ndarray | None = None  # [256,256,3] the overlay's blend of each label and photo value (render.blend_table)
    mask_rows: np.ndarray | None = None  # [H,W+1] PNG rows whose [:, 1:] is `mask` (render.png_rows): encoded as they are

    @cached_property
    def mask_png(self) -> bytes:
        return png_from_rows(self.mask_rows) if self.mask_rows is not None else encode_png(self.mask)

    @cached_property
    def color_png(self) -> bytes:
        """The mask PNG with the label colors as its palette; RGB above 255 labels."""
        if self.mask.dtype == np.uint8:
            return palette_png(self.mask_png, self.palette)
        return encode_png(colorize(self.mask, self.palette))

    @cached_property
    def color_bgr(self) -> np.ndarray:
        return colorize_bgr(self.mask, self.palette, self.lut, out=scratch("color", self.mask.shape + (3,), np.uint8))

    def overlay(self) -> np.ndarray:
        """The photo (blended in place) with the label colors at `alpha` and the legend."""
        if self.blend is not None and self.mask.dtype == np.uint8:
            return overlay_from_mask(self.photo, self.mask, self.blend, self.legend)
        return overlay_bgr(self.photo, self.color_bgr, self.alpha, self.legend, in_place=True)

    @property
    def legend(self) -> list[tuple[str, tuple[int, int, int]]]:
        return [(self.labels.names[k], self.labels.colors[k]) for k in self.present]


@dataclass(frozen=True)
class OutputKind:
    name: str
    suffix: str  # NAME + suffix is the file written beside the mirrored input path
    needs_photo: bool  # the full-size photo must be decoded
    produce: Callable[[RenderInput], bytes] | None  # None: made by the model's process, not from the label map


OUTPUT_KINDS: dict[str, OutputKind] = {
    kind.name: kind
    for kind in [
        OutputKind("mask", "_mask.png", False, lambda r: r.mask_png),  # label index per pixel
        OutputKind("color", "_color.png", False, lambda r: r.color_png),  # palette PNG in the label colors
        OutputKind("overlay", "_overlay.jpg", True,  # the photo blended with the colors, with a legend
                   lambda r: encode_jpeg_bgr(r.overlay())),
        OutputKind("embeddings", "_embed.safetensors", False, None),  # pixel embeddings, for relabel and search
    ]
}
DEFAULT_OUTPUTS = ("mask", "color", "overlay")
# what a kind becomes for a video (segcli.pipeline.video): a folder of per-frame mask PNGs, H.264 videos;
# "labels" (the per-frame fractions as CSV) is always written
VIDEO_OUTPUTS = {"mask": "_masks", "color": "_color.mp4", "overlay": "_overlay.mp4", "labels": "_labels.csv"}


def parse_outputs(spec: str) -> tuple[str, ...]:
    """'mask,overlay' -> ('mask', 'overlay'); SegcliError names the known kinds."""
    from segcli.errors import SegcliError

    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad or not kinds:
        raise SegcliError(f"--save takes any of {','.join(OUTPUT_KINDS)}; got {spec!r}")
    return kinds
