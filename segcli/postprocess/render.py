"""Color masks, overlays with a legend, and PNG/JPEG encoding.

Cheap on purpose, since on a GPU host this is what limits throughput: 8-bit label maps are
PNG-encoded without filtering, from rows that already hold PNG's filter byte (the host restores the
map into them: no copy), and deflated by ISA-L (a tenth of zlib's time on label maps), the color PNG
is the mask's own compressed data with a palette chunk (the standard for label maps, as Pascal VOC
and mmsegmentation write them), and overlays are blended in OpenCV's BGR order in one compiled pass
through a table of addWeighted's results (`blend_table`), so no full-size copy is converted, colored
or indexed pixel by pixel in Python.
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segcli.vocabulary.labels import LabelSet

try:  # ISA-L's deflate: 0.3 ms for a 2 MP label map where zlib at level 1 takes 3.5 ms (files ~1.5x larger)
    from isal.isal_zlib import compress as _isal_compress
except ImportError:  # no wheel for this platform: zlib, run-length, as fast as OpenCV's encoder
    _isal_compress = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 16-bit maps (over 255 labels): OpenCV, no filtering + run-length deflate (5x faster than adaptive filters)
_MASK_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
    _MASK_PNG += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def palette_array(labels: LabelSet) -> np.ndarray:
    """[K,3] uint8 RGB."""
    return np.asarray(labels.colors, dtype=np.uint8).reshape(-1, 3)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H,W] label map -> [H,W,3] uint8 RGB."""
    return palette[mask]


@functools.lru_cache(maxsize=16)
def font_of_size(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size`, made once per size (making it decodes the font file: ~0.1 ms)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread array reused from image to image: its memory stays mapped, so a full-size buffer
    does not cost thousands of page faults per photo. Valid until this thread asks for `name` again."""
    pool = _scratch.__dict__.setdefault("pool", {})
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = pool.get(name)
    if buf is None or buf.nbytes < size:
        buf = pool[name] = np.empty(size, np.uint8)
    return buf[:size].view(dtype).reshape(shape)


def color_lut(palette: np.ndarray) -> np.ndarray:
    """[1,256,3] uint8 lookup table for cv2.LUT: label value -> BGR color (K <= 256)."""
    lut = np.zeros((1, 256, 3), np.uint8)
    lut[0, :len(palette)] = palette[:, ::-1]
    return lut


def colorize_bgr(mask: np.ndarray, palette: np.ndarray, lut: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """[H,W] label map -> [H,W,3] uint8 BGR (a lookup table for 8-bit maps; indexing above 256 labels),
    written into `out` when given."""
    if mask.dtype == np.uint8:
        out = cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR, dst=out)
        return cv2.LUT(out, color_lut(palette) if lut is None else lut, dst=out)
    return np.take(np.ascontiguousarray(palette[:, ::-1]), mask, axis=0, out=out)


def blend_table(lut: np.ndarray, alpha: float) -> np.ndarray:
    """[256,256,3] uint8: table[label, photo value, channel] = cv2.addWeighted of the photo value
    (weight 1 - alpha) and the label's BGR color from `lut` (render.color_lut; weight alpha): made by
    addWeighted itself, so a lookup gives its pixels exactly."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3))
    colors = np.broadcast_to(lut[0][:, None, :], (256, 256, 3))
    return cv2.addWeighted(np.ascontiguousarray(values), 1.0 - alpha, np.ascontiguousarray(colors), alpha, 0.0)


def overlay_from_mask(photo: np.ndarray, mask: np.ndarray, table: np.ndarray,
                      legend: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """`overlay_bgr` of the photo and the colors of an 8-bit label map, blended into `photo` through
    `blend_table` in one compiled pass: the same pixels, without coloring the map first (at 2 MP
    that saves 5 ms of a worker's time per photo)."""
    from segcli.postprocess.kernels import blend_into

    blend_into(photo, mask, table)
    draw_legend(photo, legend, bgr=True)
    return photo


def overlay_bgr(photo: np.ndarray, color: np.ndarray, alpha: float,
                legend: list[tuple[str, tuple[int, int, int]]], in_place: bool = False) -> np.ndarray:
    """Photo [H,W,3] BGR blended with the BGR color mask, with a legend of the labels present (top-left).

    The same pixels as blending RGB arrays, channels swapped. Only the legend's corner goes
    through Pillow, so no full-size image is copied for it; `in_place` blends into `photo`."""
    blended = cv2.addWeighted(photo, 1.0 - alpha, color, alpha, 0.0, dst=photo if in_place else None)
    draw_legend(blended, legend, bgr=True)
    return blended


def _legend_layout(h: int, w: int, legend: list) -> tuple:
    size = max(10, min(h, w) // 28)
    font = font_of_size(size)
    pad, box = max(2, size // 4), size
    rows = legend[: max(1, (h - pad) // (size + pad))]
    text_w = max(int(font.getlength(name)) for name, _ in rows)
    panel_w = min(w, pad * 3 + box + text_w)
    panel_h = min(h, pad + len(rows) * (size + pad))
    return size, font, pad, box, rows, panel_w, panel_h


def legend_corner(h: int, w: int, legend: list) -> tuple[int, int]:
    """(rows, columns) of the top-left corner of an [h,w] image that drawing the legend touches: the
    panel and a font size more, so glyphs that overhang the panel land as on the whole image."""
    if not legend:
        return 0, 0
    return _corner(h, w, _legend_layout(h, w, legend))


def _corner(h: int, w: int, layout: tuple) -> tuple[int, int]:
    size, _, _, _, _, panel_w, panel_h = layout
    return min(h, panel_h + 2 * size), min(w, panel_w + 2 * size)


def draw_legend(image: np.ndarray, legend: list[tuple[str, tuple[int, int, int]]], bgr: bool,
                full_hw: tuple[int, int] | None = None) -> None:
    """Draw a darkened panel with a color box and name per label into `image` [H,W,3] (in place).
    `image` may be just the `legend_corner` of a photo of size `full_hw`."""
    if not legend:
        return
    h, w = full_hw or image.shape[:2]
    layout = _legend_layout(h, w, legend)
    size, font, pad, box, rows, panel_w, panel_h = layout
    corner_h, corner_w = _corner(h, w, layout)
    corner = Image.fromarray(np.ascontiguousarray(image[:corner_h, :corner_w]))
    panel = corner.crop((0, 0, panel_w, panel_h))
    corner.paste(Image.blend(panel, Image.new("RGB", panel.size, (0, 0, 0)), 0.6), (0, 0))
    draw = ImageDraw.Draw(corner)
    for i, (name, rgb) in enumerate(rows):
        top = pad + i * (size + pad)
        fill = tuple(rgb)[::-1] if bgr else tuple(rgb)
        draw.rectangle((pad, top, pad + box, top + box), fill=fill, outline=(255, 255, 255))
        draw.text((pad * 2 + box, top), name, fill=(255, 255, 255), font=font)
    image[:corner_h, :corner_w] = np.asarray(corner)


def png_rows(hw: tuple[int, int]) -> np.ndarray:
    """[H,W+1] uint8 (this thread's reused buffer): the rows of an unfiltered 8-bit PNG, each a filter
    byte (0: none) and then the pixels. A label map written into [:, 1:] is encoded with no copy."""
    rows = scratch("png_rows", (hw[0], hw[1] + 1), np.uint8)
    rows[:, 0] = 0
    return rows


def png_from_rows(rows: np.ndarray) -> bytes:
    """The 8-bit grayscale PNG whose rows (filter byte first, see `png_rows`) are `rows` [H,W+1]."""
    header = struct.pack(">IIBBBBB", rows.shape[1] - 1, rows.shape[0], 8, 0, 0, 0, 0)
    if _isal_compress is not None:
        data = _isal_compress(rows, 1)
    else:
        deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        data = deflate.compress(rows) + deflate.flush()
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a [H,W] uint8/uint16 map (unfiltered) or an [H,W,3] RGB image."""
    if array.ndim == 2 and array.dtype == np.uint8:
        rows = png_rows(array.shape)
        rows[:, 1:] = array
        return png_from_rows(rows)
    if array.ndim == 2:
        ok, buf = cv2.imencode(".png", array, _MASK_PNG)
    else:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def palette_png(mask_png: bytes, palette: np.ndarray) -> bytes:
    """The 8-bit grayscale PNG of a label map turned into a palette PNG with the label colors.

    Same pixel data, so the compressed stream is reused as it is: only the header's color type
    changes (0 -> 3) and a PLTE chunk is added. Opens as colors in any viewer; PIL reads indices."""
    signature, rest = mask_png[:8], mask_png[8:]
    length = struct.unpack(">I", rest[:4])[0]
    if rest[4:8] != b"IHDR" or length != 13 or rest[16] != 8 or rest[17] != 0:
        raise ValueError("palette_png needs an 8-bit grayscale PNG")
    header = bytearray(rest[8:8 + 13])
    header[9] = 3  # color type: palette
    plte = np.asarray(palette, np.uint8).reshape(-1, 3)[:256].tobytes()
    return signature + _chunk(b"IHDR", bytes(header)) + _chunk(b"PLTE", plte) + rest[8 + 13 + 4:]


def encode_jpeg_bgr(bgr: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
