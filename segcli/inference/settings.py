"""How a Segmenter reads images, as plain data (no torch: the CLI builds it before anything loads)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferenceSettings:
    """How a Segmenter reads images, as asked; None: the model's own (its `capabilities`).

    short_side, window, stride: predict's and eval's --short-side/--window/--stride (the protocol;
        window 0 = one padded canvas of imgsz).
    synonyms: "max" (each synonym scored on its own) or "mean" (one averaged embedding).
    bg_threshold: pixels whose best label is less likely than this take label 0; None: off.
    """

    short_side: int | None = None
    window: int | None = None
    stride: int | None = None
    synonyms: str | None = None
    bg_threshold: float | None = None
