"""Making a Segmenter fast on its device: compiling the image branch, and finding the batch size.

Both take a Segmenter (segcli.inference.segmenter, which calls them) and measure or prepare with
blank model inputs of the Segmenter's protocol shape before a run, so
their cost is paid once, up front, and reported, never per batch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from segcli.data.labels import LabelSet
from segcli.errors import SegcliError, one_line
from segcli.files.cache import cache_root


def compile_image_branch(seg, batch_size: int) -> float:
    """Compile the image branch (torch.compile, inductor; on a CPU with weights frozen and
    prepacked for oneDNN, on a GPU with CUDA graphs) for batches of `batch_size` model inputs,
    now, on a blank batch; smaller batches are padded to it, so it compiles once per run. Returns the
    seconds it took."""

    if seg.int8 or not isinstance(seg.model, torch.nn.Module) or not seg.model.exportable:
        raise SegcliError("--compile needs a PyTorch model in fp32, bf16 or fp16 (not an export, int8 or corrclip)")
    # inductor's disk cache beside segcli's others, not in /tmp: a later run with the same shapes
    # loads the compiled graph (not on a CPU, where frozen weights are prepacked into oneDNN
    # tensors inductor cannot store: there each run compiles, for ~12% more speed; README)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    if seg.device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant weights folded and prepacked: +35% on this CPU's bf16 (README)
    model = seg.model
    # CUDA graphs on a GPU ("reduce-overhead": the shapes are fixed), frozen weights on a CPU
    mode = "reduce-overhead" if seg.device.type == "cuda" else None
    model.pixel_embeddings = torch.compile(type(model).pixel_embeddings.__get__(model), dynamic=False, mode=mode)
    side = seg.protocol.window or seg.imgsz
    seg.compiled_batch = batch_size
    t0 = time.perf_counter()
    try:
        seg.segment_canvases(np.zeros((batch_size, side, side, 3), np.uint8), None if not model.open_vocabulary
                             else seg.label_embeddings(LabelSet.of_words(["a", "b"])))
    except Exception as exc:  # a compiler that fails here leaves the model as it was
        del model.pixel_embeddings
        seg.compiled_batch = 0
        raise SegcliError(f"cannot compile the model: {type(exc).__name__}: {one_line(str(exc), 160)}") from None
    return time.perf_counter() - t0


def best_batch_size(seg) -> tuple[int, dict]:
    """On a GPU, the batch size at which this model's throughput stops rising (or memory runs
    out), measured on blank model inputs of this protocol's shape (segcli.inference.batch_size);
    on other devices the default. Returns (batch size, images/s measured per batch size)."""
    from segcli.inference.batch_size import DEFAULT_BATCH, measured_rate, pick_batch_size

    if seg.device.type != "cuda":
        return DEFAULT_BATCH, {}
    side = seg.protocol.window or seg.imgsz
    text = seg.label_embeddings(LabelSet.of_words(["a", "b"])) if seg.model.open_vocabulary else None

    def run(batch: int) -> None:
        seg.segment_canvases(np.zeros((batch, side, side, 3), np.uint8), text, on_device=True)

    return pick_batch_size(measured_rate(run, torch.cuda.synchronize))
