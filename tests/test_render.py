"""Outputs: palette PNGs, BGR overlays and OpenCV decoding give exactly what the plain paths give."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from conftest import SAMPLES
from PIL import Image, ImageOps

from segcli.inputs.images import decode_full_bgr, decode_photo
from segcli.postprocess.render import (
    blend_table,
    color_lut,
    colorize,
    colorize_bgr,
    draw_legend,
    encode_png,
    overlay_bgr,
    overlay_from_mask,
    palette_png,
)


def _mask(h=120, w=170, k=5) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy // 30 + xx // 40) % k).astype(np.uint8)


def test_color_png_is_the_mask_with_a_palette():
    mask = _mask()
    palette = np.random.default_rng(0).integers(0, 256, (5, 3), dtype=np.uint8)
    mask_png = encode_png(mask)
    assert np.array_equal(np.array(Image.open(io.BytesIO(mask_png))), mask)
    color = Image.open(io.BytesIO(palette_png(mask_png, palette)))
    assert color.mode == "P" and np.array_equal(np.array(color), mask)  # indices for PIL ...
    assert np.array_equal(np.array(color.convert("RGB")), palette[mask])  # ... colors for any viewer
    assert np.array_equal(cv2.imdecode(np.frombuffer(palette_png(mask_png, palette), np.uint8), cv2.IMREAD_COLOR),
                          palette[mask][..., ::-1])
    with pytest.raises(ValueError):
        palette_png(encode_png(mask.astype(np.uint16)), palette)


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_mask_png_from_its_rows_reads_back_as_the_map(deflate, monkeypatch):
    """The PNG written from rows holding the filter byte (the host restores maps into them) is a
    standard 8-bit grayscale PNG of the map, with ISA-L's deflate or zlib's where ISA-L is missing."""
    from segcli.postprocess import render

    if deflate == "zlib":
        monkeypatch.setattr(render, "_isal_compress", None)
    rng = np.random.default_rng(4)
    for mask in [_mask(), np.zeros((1, 1), np.uint8), rng.integers(0, 256, (37, 61), dtype=np.uint8)]:
        rows = render.png_rows(mask.shape)
        rows[:, 1:] = mask
        data = render.png_from_rows(rows)
        assert data == encode_png(mask)
        image = Image.open(io.BytesIO(data))
        assert image.mode == "L" and np.array_equal(np.array(image), mask)
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), mask)
        assert np.array_equal(np.array(Image.open(io.BytesIO(palette_png(data, np.zeros((3, 3), np.uint8))))), mask)


def test_bgr_overlay_is_the_rgb_overlay_with_channels_swapped():
    photo = np.asarray(Image.open(SAMPLES / "cat.jpg").convert("RGB"))
    h, w = photo.shape[:2]
    mask = _mask(h, w)
    palette = np.random.default_rng(1).integers(0, 256, (5, 3), dtype=np.uint8)
    legend = [("cat", (255, 0, 0)), ("a long label name that runs past the panel", (0, 128, 255))]
    rgb = cv2.addWeighted(photo, 0.6, colorize(mask, palette), 0.4, 0.0)  # the plain RGB overlay
    draw_legend(rgb, legend, bgr=False)
    bgr = overlay_bgr(np.ascontiguousarray(photo[..., ::-1]), colorize_bgr(mask, palette), 0.4, legend)
    assert np.array_equal(rgb, bgr[..., ::-1])
    assert np.array_equal(colorize_bgr(mask.astype(np.uint16), palette), colorize(mask, palette)[..., ::-1])


def test_overlay_through_the_blend_table_is_the_colored_blend():
    """The compiled one-pass overlay (a table of addWeighted's own results) gives addWeighted's pixels:
    a real photo and random ones, widths that leave SIMD tails, opacities whose products round."""
    rng = np.random.default_rng(2)
    photo = np.ascontiguousarray(np.asarray(Image.open(SAMPLES / "cat.jpg").convert("RGB"))[..., ::-1])
    cases = [(photo, _mask(*photo.shape[:2]), 5)]
    cases += [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w), dtype=np.uint8), 256)
              for h, w in [(1, 1), (7, 33), (64, 97)]]
    legend = [("cat", (255, 0, 0)), ("sky", (0, 128, 255))]
    for bgr, mask, k in cases:
        palette = rng.integers(0, 256, (k, 3), dtype=np.uint8)
        for alpha in (0.5, 0.4, 0.77, 0.0, 1.0, 1 / 3):
            want = overlay_bgr(bgr.copy(), colorize_bgr(mask, palette), alpha, legend)
            got = bgr.copy()
            assert overlay_from_mask(got, mask, blend_table(color_lut(palette), alpha), legend) is got
            assert np.array_equal(got, want), (bgr.shape, alpha)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_opencv_full_decode_equals_pillow_for_every_exif_orientation(orientation, tmp_path):
    path = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(SAMPLES / "cat.jpg").save(path, exif=exif.tobytes(), quality=92)
    decoded = decode_photo(path, draft_long_side=64)
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert decoded.full_hw == pillow.shape[:2] and max(decoded.image.size) >= 64
    assert np.array_equal(decode_full_bgr(path)[..., ::-1], pillow)
    Image.open(path).convert("CMYK").save(tmp_path / "cmyk.jpg", exif=Image.open(path).getexif().tobytes())
    cmyk = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "cmyk.jpg")).convert("RGB"))
    assert np.array_equal(decode_full_bgr(tmp_path / "cmyk.jpg")[..., ::-1], cmyk)  # Pillow's path
