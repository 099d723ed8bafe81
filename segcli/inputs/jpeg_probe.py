"""Which JPEGs the device decoder (nvJPEG through torchvision) may take, read from their headers.

The GPU path decodes plain JPEGs in batches on the device and leaves every other file to the host
workers, which decode anything (segcli.inputs.images). This reads only the markers before the scan,
in Python, with every length checked against the bytes there are: a hostile header ends in None
(the host path), never in an exception or an out-of-range read. It reads the EXIF orientation as
Pillow's `getexif()` does (APP1 Exif, IFD0's tag 0x0112), so the device path turns a photo as the
host path does; where Pillow would look further (several Exif segments, XMP) the file is the host's.
"""

from __future__ import annotations

from dataclasses import dataclass

# start-of-frame markers: only baseline (C0) and extended sequential Huffman (C1) DCT go to the
# device; progressive, lossless, hierarchical and arithmetic-coded JPEGs are the host's
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_DEVICE_SOF = {0xC0, 0xC1}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length
# luma sampling factors the decoders share (4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1), chroma at 1x1
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)}


@dataclass(frozen=True)
class JpegProbe:
    """A JPEG the device may decode: its stored size, its orientation (EXIF 1-8) and upright size."""

    stored_hw: tuple[int, int]
    orientation: int

    @property
    def upright_hw(self) -> tuple[int, int]:
        h, w = self.stored_hw
        return (w, h) if self.orientation in (5, 6, 7, 8) else (h, w)


def probe_jpeg(data: bytes, max_pixels: int) -> JpegProbe | None:
    """The header facts of a plain 8-bit baseline (or extended sequential) Huffman JPEG with 1 or 3
    components (YCbCr or gray), usual sampling and at most `max_pixels` pixels; None for anything
    else (other formats, progressive, CMYK, Adobe RGB-coded, 12-bit, damaged headers, bombs)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    orientation, frame, adobe_transform = None, None, None
    exif_seen = xmp = False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9):  # a second SOI, or EOI before any scan
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        segment = data[i + 4:i + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            if exif_seen:  # Pillow joins the segments: an IFD0 across them is the host's to read
                return None
            exif_seen, orientation = True, exif_orientation(segment[6:])
        elif marker == 0xE1 and segment.startswith(b"http://ns.adobe.com/xap/1.0/"):
            xmp = True
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        elif marker in _SOF:
            if frame is not None or marker not in _DEVICE_SOF:
                return None
            frame = segment
        elif marker == 0xDA:  # start of scan: the header is over
            break
        i += 2 + length
    else:
        return None  # no scan
    hw = _frame_size(frame)
    if hw is None or hw[0] * hw[1] > max_pixels:
        return None
    if frame[5] == 3 and adobe_transform == 0:  # 3 components stored as RGB, not YCbCr
        return None
    if orientation is None and xmp:  # Pillow then reads XMP's tiff:Orientation: the host's to read
        return None
    return JpegProbe(hw, orientation if orientation in range(1, 9) else 1)


def _frame_size(frame: bytes | None) -> tuple[int, int] | None:
    """SOF payload -> (height, width) when 8-bit, 1 or 3 components with usual sampling, else None."""
    if frame is None or len(frame) < 6:
        return None
    precision, h, w, components = frame[0], int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"), frame[5]
    if precision != 8 or h == 0 or w == 0 or components not in (1, 3) or len(frame) < 6 + 3 * components:
        return None
    sampling = [(frame[7 + 3 * c] >> 4, frame[7 + 3 * c] & 15) for c in range(components)]
    if components == 3 and (sampling[0] not in _LUMA_SAMPLING or sampling[1:] != [(1, 1), (1, 1)]):
        return None
    return h, w


def exif_orientation(tiff: bytes) -> int | None:
    """IFD0's Orientation (tag 0x0112, SHORT or LONG) of an Exif block's TIFF data; None when absent
    or unreadable."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    offset = int.from_bytes(tiff[4:8], order)
    if offset + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[offset:offset + 2], order)
    for k in range(count):
        entry = tiff[offset + 2 + 12 * k:offset + 14 + 12 * k]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == 0x0112:
            kind, values = int.from_bytes(entry[2:4], order), int.from_bytes(entry[4:8], order)
            if values != 1 or kind not in (3, 4):  # Pillow reads several values as a tuple: no turn
                return None
            return int.from_bytes(entry[8:10] if kind == 3 else entry[8:12], order)
    return None
