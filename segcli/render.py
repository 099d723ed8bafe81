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


def plot_curves(loss: list[tuple[int, float]], miou: list[tuple[int, float]], size=(900, 360)) -> bytes:
    """PNG of two panels over training steps: loss (left) and validation mIoU (right)."""
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font(14)
    last_step = max([s for s, _ in loss + miou] or [1])
    for panel, (title, points, fixed) in enumerate((("training loss", loss, None), ("validation mIoU", miou, (0.0, 1.0)))):
        x0, x1 = panel * width // 2 + 50, (panel + 1) * width // 2 - 15
        y0, y1 = 30, height - 35
        draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        draw.text((x0, 8), title, fill="black", font=font)
        draw.text((x1 - 60, y1 + 8), f"step {last_step}", fill="black", font=font)
        if not points:
            continue
        lo, hi = fixed or (min(v for _, v in points), max(v for _, v in points))
        hi = hi if hi > lo else lo + 1.0
        draw.text((4, y0) if panel == 0 else (x0 - 45, y0), f"{hi:.2f}", fill="black", font=font)
        draw.text((4, y1 - 14) if panel == 0 else (x0 - 45, y1 - 14), f"{lo:.2f}", fill="black", font=font)
        xy = [(x0 + (x1 - x0) * s / last_step, y1 - (y1 - y0) * (v - lo) / (hi - lo)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        for x, y in xy[-1:] if panel == 0 else xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(214, 39, 40))
    return encode_png(np.asarray(img))
