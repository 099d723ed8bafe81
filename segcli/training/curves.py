"""Training curves as a PNG (the run folder's curves.png): loss and validation mIoU over the steps."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from segcli.postprocess.render import encode_png, font_of_size


def plot_curves(loss: list[tuple[int, float]], miou: list[tuple[int, float]], size=(900, 360)) -> bytes:
    """PNG of two panels over training steps: loss (left) and validation mIoU (right)."""
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = font_of_size(14)
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
