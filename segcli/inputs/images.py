"""Decoding any photo to RGB (EXIF, modes, bit depths, bombs); its fitting to the model is segcli.inputs.geometry."""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # larger images are refused as likely decompression bombs

# Leading bytes of the formats Pillow decodes; used to recognise images by content, not name.
_SIGNATURES = (
    b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm", ".pbm", ".jp2", ".j2k"}


class ImageDecodeError(Exception):
    """An input that is not a usable image; the message is one line for the user. `reason` says
    which kind of failure (the server answers each with its HTTP status): "too_large" (the pixel
    limit, bombs), "not_image", or "unreadable"."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def read_head(path: Path) -> bytes:
    """The first 16 bytes of a file (empty when it cannot be read): enough to tell its format."""
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def has_image_signature(head: bytes) -> bool:
    """True when `head` (a file's first bytes) is the signature of a decodable image format."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(sig) for sig in _SIGNATURES)


def looks_like_image(path: Path) -> bool:
    return has_image_signature(read_head(path))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited on white; 16-bit is scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else arr.max()
        else:
            top = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image at full size."""
    return decode_photo(path, max_pixels).image


@dataclass
class DecodedPhoto:
    image: Image.Image  # upright RGB; reduced by DCT scaling when a draft size was asked for
    full_hw: tuple[int, int]  # the photo's full upright size


def decode_photo(path: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_long_side: int | Callable[[int, int], int] | None = None) -> DecodedPhoto:
    """Read and decode `path` (or its bytes) to an upright RGB image, DCT-reduced for JPEGs when only
    `draft_long_side` pixels (or draft_long_side(w, h)) are needed on the long side. Failures:
    ImageDecodeError, one line."""
    with _decode_errors():
        img, _ = _open(path, max_pixels)
        w, h = img.size
        if draft_long_side and img.format == "JPEG":
            scale = (draft_long_side(w, h) if callable(draft_long_side) else draft_long_side) / max(w, h)
            if scale < 1:
                img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        img.load()
        upright = ImageOps.exif_transpose(img)
        # the upright size from what decoding gave, never from a tag read before it: Pillow's TIFF
        # loader applies the orientation itself (its size is upright from the start) while a JPEG's
        # is applied here; a DCT-reduced decode keeps the full size's aspect
        turned = upright.size != img.size
        return DecodedPhoto(to_rgb(upright), (w, h) if turned else (h, w))


def decode_full_bgr(path: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The upright full-size photo (a file or its bytes) as [H,W,3] uint8 BGR (OpenCV's order, for
    blending and encoding). Plain JPEGs are decoded by OpenCV (twice as fast as Pillow, the same pixels); others by Pillow."""
    with _decode_errors():
        img, data = _open(path, max_pixels)
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            photo = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF orientation
            w, h = img.size  # a JPEG's orientation is the EXIF tag's, which OpenCV and Pillow both apply
            if photo is not None and photo.shape[:2] == ((w, h) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)):
                return photo
        img.load()
        return cv2.cvtColor(np.asarray(to_rgb(ImageOps.exif_transpose(img))), cv2.COLOR_RGB2BGR)


def _open(path: str | Path | bytes, max_pixels: int) -> tuple[Image.Image, bytes]:
    """(lazily opened image, the file's bytes) after the size checks."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(
            f"image is {w}x{h} ({w * h / 1e6:.3g} MP), above the {max_pixels / 1e6:.3g} MP limit "
            "(possible decompression bomb; raise --max-pixels to allow)", "too_large")
    if w < 1 or h < 1:
        raise ImageDecodeError("image has no pixels")
    return img, data


@contextmanager
def _decode_errors():
    """Every way decoding can fail becomes an ImageDecodeError with a one-line message."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}", "too_large") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised content)", "not_image") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError, cv2.error) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageDecodeError(f"cannot decode image: {msg}") from None
