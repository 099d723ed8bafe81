"""The output kinds of `segcli predict`, as one table: a new kind is one entry here.

Each kind names its file suffix, whether it needs the full-size decoded photo (decoding can skip
detail otherwise), and how its bytes are produced from a label map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from segcli.labels import LabelSet
from segcli.render import colorize, encode_jpeg, encode_png, overlay


@dataclass
class RenderInput:
    """What every producer may use for one image. `mask` [H,W] at the photo's size; `photo` [H,W,3]
    RGB, present only when some requested kind needs it; `present` label indices, most pixels first."""

    mask: np.ndarray
    labels: LabelSet
    palette: np.ndarray  # [K,3] uint8
    present: list[int]
    alpha: float
    photo: np.ndarray | None = None

    @cached_property
    def color(self) -> np.ndarray:
        """[H,W,3] the mask in the label colors (computed once, shared by color and overlay)."""
        return colorize(self.mask, self.palette)

    @property
    def legend(self) -> list[tuple[str, tuple[int, int, int]]]:
        return [(self.labels.names[k], self.labels.colors[k]) for k in self.present]


@dataclass(frozen=True)
class OutputKind:
    name: str
    suffix: str  # NAME + suffix is the file written beside the mirrored input path
    needs_photo: bool  # the full-size photo must be decoded
    produce: Callable[[RenderInput], bytes]
    help: str


OUTPUT_KINDS: dict[str, OutputKind] = {
    kind.name: kind
    for kind in [
        OutputKind("mask", "_mask.png", False, lambda r: encode_png(r.mask),
                   "label index per pixel (0 = first label); 16-bit PNG above 255 labels"),
        OutputKind("color", "_color.png", False, lambda r: encode_png(r.color), "the mask in the label colors"),
        OutputKind("overlay", "_overlay.jpg", True,
                   lambda r: encode_jpeg(overlay(r.photo, r.color, r.alpha, r.legend)),
                   "the photo blended with the colors, with a legend"),
    ]
}
DEFAULT_OUTPUTS = tuple(OUTPUT_KINDS)


def parse_outputs(spec: str) -> tuple[str, ...]:
    """'mask,overlay' -> ('mask', 'overlay'); SegcliError names the known kinds."""
    from segcli.errors import SegcliError

    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad or not kinds:
        raise SegcliError(f"--save takes any of {','.join(OUTPUT_KINDS)}; got {spec!r}")
    return kinds
