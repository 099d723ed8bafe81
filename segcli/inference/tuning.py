"""Making a Segmenter fast on its device: compiling the image branch, and finding the batch size.

Both measure or prepare with blank model inputs of the runner's protocol shape before a run, so
their cost is paid once, up front, and reported, never per batch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from segcli.errors import SegcliError, one_line
from segcli.files.cache import cache_root
from segcli.inference.runner import SegmentRunner
from segcli.vocabulary.labels import LabelSet


class CompiledBackend:
    """A PyTorch backend whose image branch runs compiled (torch.compile, inductor) for batches of
    exactly `batch` inputs: a smaller batch is padded to it (so it compiles once) and the padding
    dropped before scoring. The rest of the backend contract is the model's own (delegated)."""

    def __init__(self, model: torch.nn.Module, batch: int, mode: str | None):
        self.model, self.batch = model, batch
        self.branch = torch.compile(model.pixel_embeddings, dynamic=False, mode=mode)

    def __getattr__(self, name: str):
        return getattr(self.model, name)  # sizes, capabilities, labels: the wrapped model's

    def dense_logits(self, images: torch.Tensor, label_embeddings: torch.Tensor | None,
                     autocast_dtype: torch.dtype | None = None, return_embeddings: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As the model's dense_logits ([B,3,H,W] -> logits [B,K,H/s,W/s]), through the compiled branch."""
        count = images.shape[0]
        if count < self.batch:  # the compiled shape: pad, then drop the padding
            images = torch.cat([images, images.new_zeros((self.batch - count, *images.shape[1:]))])
        with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            emb = self.branch(images)[:count]
        return self.model.score(emb, label_embeddings, return_embeddings)


def compile_image_branch(runner: SegmentRunner, batch_size: int, int8: bool) -> tuple[SegmentRunner, float]:
    """`runner` with its image branch compiled (on a CPU with weights frozen and prepacked for
    oneDNN, on a GPU with CUDA graphs) for batches of `batch_size` model inputs, compiled now on a
    blank batch; and the seconds that took."""
    model = runner.model
    if int8 or not isinstance(model, torch.nn.Module) or not model.capabilities.exportable:
        why = model.capabilities.limits or ("int8" if int8 else "an export")
        raise SegcliError(f"--compile needs a PyTorch model in fp32, bf16 or fp16 whose image branch traces ({why})")
    # inductor's disk cache beside segcli's others, not in /tmp: a later run with the same shapes
    # loads the compiled graph (not on a CPU, where frozen weights are prepacked into oneDNN
    # tensors inductor cannot store: there each run compiles; docs/performance.md)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    if runner.device.type == "cpu":
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant weights folded and prepacked (docs/performance.md)
    # CUDA graphs on a GPU ("reduce-overhead": the shapes are fixed), frozen weights on a CPU
    mode = "reduce-overhead" if runner.device.type == "cuda" else None
    compiled = runner.with_backend(CompiledBackend(model, batch_size, mode))
    side = runner.protocol.window or runner.imgsz
    t0 = time.perf_counter()
    try:
        compiled.segment_canvases(np.zeros((batch_size, side, side, 3), np.uint8), _blank_labels(model))
    except Exception as exc:  # a compiler that fails here leaves the runner as it was
        raise SegcliError(f"cannot compile the model: {type(exc).__name__}: {one_line(str(exc), 160)}") from None
    return compiled, time.perf_counter() - t0


def best_batch_size(runner: SegmentRunner) -> tuple[int, dict]:
    """On a GPU, the batch size at which this model's throughput stops rising (or memory runs
    out), measured on blank model inputs of this protocol's shape (segcli.inference.batch_size);
    on other devices the default. Returns (batch size, images/s measured per batch size)."""
    from segcli.inference.batch_size import DEFAULT_BATCH, measured_rate, pick_batch_size

    if runner.device.type != "cuda":
        return DEFAULT_BATCH, {}
    side = runner.protocol.window or runner.imgsz
    text = _blank_labels(runner.model)

    def run(batch: int) -> None:
        runner.segment_canvases(np.zeros((batch, side, side, 3), np.uint8), text, on_device=True)

    return pick_batch_size(measured_rate(run, torch.cuda.synchronize))


def _blank_labels(model) -> torch.Tensor | None:
    return model.label_embeddings(LabelSet.of_words(["a", "b"])) if model.open_vocabulary else None
