"""How an image meets the model, as plain numbers and numpy (no torch: the workers import it).

`Protocol` says which way a model reads images: one canvas (the image resized by its long side to
`imgsz` and padded bottom/right with black: LSeg's way), or the training-free methods' protocol,
which their published numbers are measured with: the image is resized so its short side is N (long
side at most 2048, mmseg's `Resize(scale=(2048, N), keep_ratio=True)`), windows of W pixels every S
pixels cover it (the last one flush with the image's edge), each window's logits are upsampled
(bilinear) to its pixels, and each pixel takes the mean over the windows that cover it: the
authors' forward_slide (the averaging is segcli.inference.windows). A window larger than the image
is padded with black (the authors run the smaller crop).

CAT-Seg's protocol differs in two ways, each a field: `square` stretches the image to
short_side x short_side (its `inference_sliding_window` stretches every photo to 640 x 640, in
float, after detectron2's short-side resize to 640, which is what `model_pixels` gives), and
`global_view` adds the short-side image resized to one window, whose upsampled scores are averaged
half and half with the windows'. The runner (segcli.inference.runner) does both in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from segcli.errors import SegcliError, check_input_size


@dataclass(frozen=True)
class Protocol:
    """How images meet the model: `window` None = one canvas of `imgsz` (long side, padded);
    else resized to `short_side` and covered by windows of `window` every `stride` pixels."""

    short_side: int | None = None
    window: int | None = None
    stride: int | None = None
    square: bool = False  # resized to short_side x short_side, aspect not kept (CAT-Seg)
    global_view: bool = False  # with `square`: plus the whole image as one window, half the weight (CAT-Seg)

    @property
    def sliding(self) -> bool:
        return self.window is not None

    def describe(self) -> str:
        if not self.sliding:
            return "one canvas (long side = imgsz, padded)"
        if self.square:
            short = f"resized to {self.short_side} x {self.short_side}"
        else:
            short = f"short side {self.short_side}" if self.short_side else "the canvas's long side"
        view = ", plus the whole image as one window (half the weight)" if self.global_view else ""
        return f"{short}, {self.window}-pixel windows every {self.stride}, logits averaged{view}"

    def to_json(self) -> dict:
        """As run records keep it: CAT-Seg's two fields only where they are set (older records match)."""
        data = {"short_side": self.short_side, "window": self.window, "stride": self.stride}
        data.update({k: True for k in ("square", "global_view") if getattr(self, k)})
        return data


@dataclass
class Canvas:
    """An image fitted into the model's square input: uint8 [S,S,3], image at the top-left."""

    pixels: np.ndarray
    resized_hw: tuple[int, int]  # size of the image inside the canvas


def long_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the long side at `size`, aspect kept."""
    scale = size / max(w, h)
    return max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))


def resize_long_side(img: Image.Image, size: int) -> Image.Image:
    """`img` with its long side at `size` (aspect kept; Pillow's bilinear, antialiased when shrinking)."""
    rw, rh = long_side_size(*img.size, size)
    return img.resize((rw, rh), Image.BILINEAR) if (rw, rh) != img.size else img


def fit_to_canvas(img: Image.Image, size: int) -> Canvas:
    """Resize so the long side is `size` (resize_long_side), pad bottom/right with black."""
    resized = resize_long_side(img, size)
    rw, rh = resized.size
    pixels = np.zeros((size, size, 3), dtype=np.uint8)  # black = LSeg's padding value
    pixels[:rh, :rw] = np.asarray(resized)
    return Canvas(pixels=pixels, resized_hw=(rh, rw))


MAX_LONG_SIDE = 2048  # the peers' configs: img_scale=(2048, short side)


def resolve_protocol(default: Protocol | None, short_side: int | None, window: int | None, stride: int | None,
                     multiple: int) -> Protocol:
    """The user's --short-side/--window/--stride over the model's default protocol. --window 0
    turns windows off (one canvas); a stride defaults to half the window (the peers' ratio). A
    window is a model input (a multiple of `multiple`)."""
    base = default or Protocol()
    for value, name in ((short_side, "--short-side"), (stride, "--stride")):
        if value is not None and value < 1:
            raise SegcliError(f"{name} {value}: give a positive number of pixels")
    if window == 0:
        if short_side or stride:
            raise SegcliError("--window 0 means one canvas: --short-side and --stride need windows")
        return Protocol()
    window = window or base.window
    if window is None:
        if short_side or stride:
            raise SegcliError("--short-side and --stride slide windows: give --window too (e.g. --window 448)")
        return Protocol()
    if stride is None:  # the model's, or for a window of the user's the peers' ratio: half of it
        stride = base.stride if window == base.window else window // 2
    short_side = short_side or base.short_side
    check_input_size(window, multiple, "--window")
    if stride > window:
        raise SegcliError(f"--stride {stride}: at most the window ({window} pixels)")
    return Protocol(short_side, window, stride, square=base.square and bool(short_side),
                    global_view=base.global_view and base.square and bool(short_side))


def short_side_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side` and the long side at most 2048, aspect
    kept (mmseg's keep-ratio rescale, rounded as it rounds: int(x * scale + 0.5))."""
    scale = min(short_side / min(w, h), MAX_LONG_SIDE / max(w, h))
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def resize_short_side(image: Image.Image, short_side: int) -> np.ndarray:
    """An RGB image -> [h,w,3] uint8 with its short side at `short_side` (see short_side_size)."""
    size = short_side_size(image.width, image.height, short_side)
    resized = image.resize(size, Image.BILINEAR) if size != image.size else image
    return np.array(resized.convert("RGB"))  # writable: torch takes it as it is


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering `length` pixels, as mmseg's slide inference places them: every
    `stride`, the last one moved back to end flush with the edge (one window at 0 if it is longer)."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(count)]


def windows(hw: tuple[int, int], window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the windows over an image of `hw` pixels."""
    return [(y, x) for y in window_starts(hw[0], window, stride) for x in window_starts(hw[1], window, stride)]


def window_tiles(pixels: np.ndarray, window: int, stride: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """[h,w,3] uint8 -> (corners, tiles [N,window,window,3]): the image's windows, zero-padded
    where the image is smaller than a window."""
    corners = windows(pixels.shape[:2], window, stride)
    tiles = np.zeros((len(corners), window, window, 3), np.uint8)
    for i, (y, x) in enumerate(corners):
        crop = pixels[y:y + window, x:x + window]
        tiles[i, :crop.shape[0], :crop.shape[1]] = crop
    return corners, tiles


def model_pixels(image: Image.Image, imgsz: int, protocol: Protocol) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image -> (the model's pixels, the image's size in them): one canvas [imgsz,imgsz,3]
    with the image at its top-left, or for windows the resized image itself [h,w,3] (a `square`
    protocol: the short-side image, and the square its scores cover)."""
    if not protocol.sliding:
        canvas = fit_to_canvas(image, imgsz)
        return canvas.pixels, canvas.resized_hw
    if protocol.square:  # the image's extent is the square its scores cover
        return resize_square_first(image, protocol.short_side), (protocol.short_side, protocol.short_side)
    if protocol.short_side:
        pixels = resize_short_side(image, protocol.short_side)
    else:  # windows over the long side at imgsz
        pixels = np.array(resize_long_side(image, imgsz).convert("RGB"))
    return pixels, pixels.shape[:2]


def square_first_size(w: int, h: int, side: int) -> tuple[int, int]:
    """(width, height) of CAT-Seg's first resize: detectron2's ResizeShortestEdge(side, max 2560)."""
    scale = min(side / min(w, h), 2560 / max(w, h))
    return max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))


def resize_square_first(image: Image.Image, side: int) -> np.ndarray:
    """CAT-Seg's test mapper: the short side to `side` with Pillow's bilinear (detectron2's
    ResizeShortestEdge on uint8) -> [h,w,3] uint8. The stretch to side x side is made in float
    by the runner, as the authors' inference_sliding_window does."""
    size = square_first_size(image.width, image.height, side)
    return np.array((image.resize(size, Image.BILINEAR) if size != image.size else image).convert("RGB"))


def model_size(w: int, h: int, imgsz: int, protocol: Protocol) -> tuple[int, int]:
    """(width, height) an image of w x h pixels is resized to by `model_pixels`."""
    if protocol.sliding and protocol.square:  # the extent of its scores (the pixels are square_first_size)
        return protocol.short_side, protocol.short_side
    if protocol.sliding and protocol.short_side:
        return short_side_size(w, h, protocol.short_side)
    return long_side_size(w, h, imgsz)


def draft_size(w: int, h: int, imgsz: int, protocol: Protocol) -> int:
    """The long side a reduced (DCT) decode must keep for `model_pixels` at this protocol."""
    if protocol.sliding and protocol.square:
        return max(square_first_size(w, h, protocol.short_side))
    if protocol.sliding and protocol.short_side:
        return max(short_side_size(w, h, protocol.short_side))
    return imgsz
