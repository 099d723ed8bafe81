"""Color masks, overlays with a legend, and PNG/JPEG encoding."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segcli.labels import LabelSet


def palette_array(labels: LabelSet) -> np.ndarray:
    """[K,3] uint8 RGB."""
    return np.asarray(labels.colors, dtype=np.uint8).reshape(-1, 3)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H,W] label map -> [H,W,3] uint8 RGB."""
    return palette[mask]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def overlay(photo: np.ndarray, color: np.ndarray, alpha: float, legend: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """Photo [H,W,3] blended with the color mask, with a legend of the labels present (top-left)."""
    blended = cv2.addWeighted(photo, 1.0 - alpha, color, alpha, 0.0)
    if not legend:
        return blended
    h, w = blended.shape[:2]
    size = max(10, min(h, w) // 28)
    font = _font(size)
    pad, box = max(2, size // 4), size
    rows = legend[: max(1, (h - pad) // (size + pad))]
    text_w = max(int(font.getlength(name)) for name, _ in rows)
    panel_w = min(w, pad * 3 + box + text_w)
    panel_h = min(h, pad + len(rows) * (size + pad))
    img = Image.fromarray(blended)
    region = img.crop((0, 0, panel_w, panel_h))
    region = Image.blend(region, Image.new("RGB", region.size, (0, 0, 0)), 0.6)
    img.paste(region, (0, 0))
    draw = ImageDraw.Draw(img)
    for i, (name, rgb) in enumerate(rows):
        top = pad + i * (size + pad)
        draw.rectangle((pad, top, pad + box, top + box), fill=tuple(rgb), outline=(255, 255, 255))
        draw.text((pad * 2 + box, top), name, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a [H,W] uint8/uint16 map or an [H,W,3] RGB image."""
    data = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
