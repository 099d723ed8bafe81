"""Stored pixel embeddings: encode a photo once, ask it any labels later.

`NAME_embed.safetensors` holds one tensor, "embeddings" [C,h,w]: the pixel embeddings of the cells
that cover the photo (not the canvas padding), as the model computed them (not normalised) at its
own output stride, or average-pooled unit vectors (then normalised) at a coarser `--embed-stride`.
The JSON metadata (safetensors' string map, key "segcli") says which model made them and how to
bring a label map back to the photo's size:

    model, model_fingerprint, family, channels, stride (input pixels per cell), imgsz,
    full_hw (the photo), resized_hw (the photo inside the model's canvas, in input pixels),
    normalised, compute_dtype, photo (path, size, mtime_ns when stored), segcli_version

Read one with safetensors alone:

    from safetensors.numpy import load_file  # (float16/float32 files; bfloat16 needs safetensors.torch)
    e = load_file("cat_embed.safetensors")["embeddings"].astype("float32")      # [C,h,w]
    e /= np.linalg.norm(e, axis=0, keepdims=True); best = np.einsum("chw,c->hw", e, text_embedding)
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from segcli.errors import SegcliError
from segcli.postprocess.label_map import restore_label_map
from segcli.version import __version__
from segcli.vocabulary.labels import LabelSet

EMBED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SUFFIX = "_embed.safetensors"


@dataclass(frozen=True)
class EmbeddingInfo:
    """What a stored embedding file says about itself (its JSON metadata)."""

    model: str
    model_fingerprint: str
    family: str
    channels: int
    stride: int  # input (canvas) pixels per stored cell
    imgsz: int
    full_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    normalised: bool
    compute_dtype: str  # what the model computed in (float32, bfloat16, float16)
    photo: dict | None = None  # {"path", "size", "mtime_ns"} of the photo when it was stored
    segcli_version: str = __version__

    @property
    def extent(self) -> tuple[float, float]:
        """The photo's exact extent in stored cells (the last row/column may be partly covered)."""
        return self.resized_hw[0] / self.stride, self.resized_hw[1] / self.stride

    @classmethod
    def of(cls, seg, region: torch.Tensor, stride: int, full_hw: tuple[int, int], resized_hw: tuple[int, int],
           photo: dict | None = None) -> "EmbeddingInfo":
        """What `seg` (a Segmenter) made: `region` [C,h,w] at `stride` for a photo of `full_hw`."""
        model = seg.model
        return cls(model=seg.name, model_fingerprint=seg.fingerprint, family=model.capabilities.family,
                   channels=int(region.shape[0]), stride=stride, imgsz=seg.imgsz, full_hw=tuple(full_hw),
                   resized_hw=tuple(resized_hw), normalised=stride != model.output_stride,
                   compute_dtype=dtype_name(seg.autocast_dtype or torch.float32), photo=photo)

    @classmethod
    def from_json(cls, text: str) -> "EmbeddingInfo":
        data = json.loads(text)
        data["full_hw"], data["resized_hw"] = tuple(data["full_hw"]), tuple(data["resized_hw"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (as run records and file metadata spell it)."""
    return str(dtype).removeprefix("torch.")


def resolve_embed_dtype(spec: str, compute: torch.dtype | None) -> torch.dtype:
    """auto: the 16-bit dtype the model computed in (lossless), else float16 (half the bytes of fp32)."""
    if spec == "auto":
        return compute if compute in (torch.float16, torch.bfloat16) else torch.float16
    if spec not in EMBED_DTYPES:
        raise SegcliError(f"--embed-dtype takes auto, {', '.join(EMBED_DTYPES)}; got {spec!r}")
    return EMBED_DTYPES[spec]


def check_embed_stride(stride: int | None, output_stride: int) -> int:
    """The stored stride: the model's own by default, else a multiple of it."""
    if stride is None:
        return output_stride
    if stride < output_stride or stride % output_stride:
        raise SegcliError(f"--embed-stride {stride}: use a multiple of this model's output stride ({output_stride})")
    return stride


def pool(region: torch.Tensor, factor: int) -> torch.Tensor:
    """[C,h,w] raw embeddings -> [C,ceil(h/f),ceil(w/f)] unit vectors: each the normalised mean of
    the unit vectors of the (up to f x f) cells it covers; edge blocks average only real cells."""
    if factor == 1:
        return region
    unit = F.normalize(region.float(), dim=0)
    pooled = F.avg_pool2d(unit[None], factor, factor, ceil_mode=True, count_include_pad=False)[0]
    return F.normalize(pooled, dim=0)


def encode(region: torch.Tensor, info: EmbeddingInfo, dtype: torch.dtype) -> bytes:
    """One photo's file: the tensor [C,h,w] in `dtype`, and `info` as metadata."""
    tensor = region.detach().to("cpu", dtype).contiguous()
    return safetensors_bytes({"embeddings": tensor}, metadata={"segcli": json.dumps(asdict(info))})


class PixelEmbeddings:
    """One photo's pixel embeddings [C,h,w] (cells covering the photo) and what they came from.

    >>> [emb] = seg.embed(["photo.jpg"])            # or segcli.embeddings.format.load("photo_embed.safetensors", seg)
    >>> emb.query("road,car,sky").shape               # (H, W) label map at the photo's size
    """

    def __init__(self, embeddings: torch.Tensor, info: EmbeddingInfo, segmenter=None):
        self.embeddings, self.info, self.segmenter = embeddings, info, segmenter

    @torch.inference_mode()
    def scores(self, label_embeddings: torch.Tensor) -> torch.Tensor:
        """[K,C] normalised text embeddings -> logits [K,h,w] fp32, exactly as the model scores: on
        the canvas's grid of cells as predict did (the same shapes give the same rounding)."""
        grid = -(-self.info.imgsz // self.info.stride)
        c, h, w = self.embeddings.shape
        canvas = _grid_buffer((max(grid, h), max(grid, w), c), label_embeddings.device)  # [G,G,C], channels last
        canvas[:h, :w].copy_(self.embeddings.permute(1, 2, 0))
        canvas[h:].zero_()
        canvas[:h, w:].zero_()
        return self._model().image_logits(canvas.permute(2, 0, 1), label_embeddings)[:, :h, :w]

    def query(self, labels: str | LabelSet, prompt: str | None = None) -> np.ndarray:
        """Label map [H,W] at the photo's full size for `labels` (the text tower runs, the image's does not)."""
        seg = self._segmenter()
        label_set = seg.resolve_labels(labels)
        text = seg.label_embeddings(label_set, prompt)
        return restore_label_map(self.scores(text), self.info.extent, self.info.full_hw, groups=seg.label_groups(label_set))

    def _segmenter(self):
        if self.segmenter is None:
            raise SegcliError("these embeddings have no model attached: load them with load(path, segmenter)")
        return self.segmenter

    def _model(self):
        return self._segmenter().model


_buffers = threading.local()


def _grid_buffer(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A float32 buffer of `shape`, kept between photos (per thread): a fresh one costs page faults."""
    buffer = getattr(_buffers, "grid", None)
    if buffer is None or tuple(buffer.shape) != shape or buffer.device != torch.device(device):
        buffer = _buffers.grid = torch.empty(shape, dtype=torch.float32, device=device)
    return buffer


def read_info(path: str | Path) -> EmbeddingInfo:
    """The metadata of a stored `NAME_embed.safetensors` (its header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("segcli")
        if meta is None:
            raise ValueError("no segcli metadata")
        return EmbeddingInfo.from_json(meta)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SegcliError(f"{path} is not a readable segcli embeddings file ({exc})") from None


def read_tensor(path: str | Path) -> torch.Tensor:
    """The stored `embeddings` tensor [C,h,w] of a file whose header was read already."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("embeddings")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SegcliError(f"{path} is not a readable segcli embeddings file ({exc})") from None


def load(path: str | Path, segmenter=None) -> PixelEmbeddings:
    """Read a stored `NAME_embed.safetensors`. With `segmenter`, checks that its model made them
    (fingerprint) and allows `.query(labels)`."""
    info = read_info(path)
    if segmenter is not None:
        check_same_model(info, segmenter, path)
    return PixelEmbeddings(read_tensor(path), info, segmenter)


def check_same_model(info: EmbeddingInfo, segmenter, path: Path | str) -> None:
    if info.model_fingerprint != segmenter.fingerprint:
        raise SegcliError(f"{path} was made by another model ({info.model}, {info.model_fingerprint[:30]}), "
                          f"not {segmenter.name} ({segmenter.fingerprint[:30]}): give --model the file that made it")
