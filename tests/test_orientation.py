"""Orientation-tagged photos come out at their upright size, whatever the format: the size the
label map is restored at is the size of the photo the overlay is blended into (a TIFF whose size
was read before decoding once made the compiled blend write past the photo)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from segcli.cli import app
from segcli.inputs.images import decode_full_bgr, decode_photo

STORED = (88, 59)  # (w, h) as stored: orientations 5-8 make it 59 wide and 88 high


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (STORED[1], STORED[0], 3), dtype=np.uint8)
    pixels[:10, :20] = (255, 0, 0)  # a corner that tells the orientation
    return Image.fromarray(pixels)


def _tagged(fmt: str, orientation: int, **kw) -> bytes:
    out = io.BytesIO()
    img = _photo()
    if fmt == "TIFF":
        img.save(out, "TIFF", tiffinfo={274: orientation}, **kw)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(out, fmt, exif=exif, **kw)
    return out.getvalue()


def _pillow_upright(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


CASES = ([("JPEG", {}, o) for o in range(1, 9)]
         + [("TIFF", {"compression": c}, o) for c in (None, "tiff_lzw", "tiff_deflate", "jpeg") for o in range(1, 9)]
         + [("PNG", {}, o) for o in (1, 3, 6, 8)] + [("WEBP", {"lossless": True}, o) for o in (1, 3, 6, 8)])


@pytest.mark.parametrize("fmt,kw,orientation", CASES)
def test_every_format_decodes_at_the_upright_size_pillow_gives(fmt, kw, orientation):
    data = _tagged(fmt, orientation, **kw)
    upright = _pillow_upright(data)
    decoded = decode_photo(data)
    assert decoded.full_hw == upright.shape[:2]
    assert np.asarray(decoded.image).shape == upright.shape
    if fmt != "JPEG" and kw.get("compression") != "jpeg":  # lossless: the very pixels
        assert np.array_equal(np.asarray(decoded.image), upright)
    bgr = decode_full_bgr(data)
    assert bgr.shape[:2] == decoded.full_hw
    assert np.abs(bgr[..., ::-1].astype(int) - upright).mean() < 3  # OpenCV's JPEG decoder rounds differently


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_reduced_jpeg_decodes_keep_the_full_upright_size(orientation):
    data = _tagged("JPEG", orientation)
    decoded = decode_photo(data, draft_long_side=16)  # DCT-reduced: smaller pixels, the full size still known
    assert decoded.full_hw == _pillow_upright(data).shape[:2]
    assert max(decoded.image.size) < max(STORED)


def test_rotated_tiffs_go_through_predict_at_their_upright_size(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for o in (1, 5, 6, 7, 8):
        (photos / f"scan{o}.tif").write_bytes(_tagged("TIFF", o, compression="tiff_lzw"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(photos), "-m", str(tiny_checkpoint), "-l", "cat,sky",
                                      "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    for o in (1, 5, 6, 7, 8):
        mask = Image.open(out / f"scan{o}_mask.png")
        overlay = Image.open(out / f"scan{o}_overlay.jpg")
        want = STORED if o == 1 else STORED[::-1]
        assert mask.size == overlay.size == want
