"""The predict engine: a stream of named stages from SOURCE files to outputs in a run folder.

    decode (worker pool, bounded window) -> infer (main thread, batches)
      -> restore (label map at the photo's size) -> render (one entry of OUTPUT_KINDS each) -> write
         (the same worker pool, bounded)

Memory depends on the batch size and window, never on the number of inputs. The run folder's
bookkeeping (settings check, records, summaries) is `segcli.runfolder.RunFolder`; what each output
kind is and how it is made is the table `segcli.outputs.OUTPUT_KINDS`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from segcli.api import Segmenter
from segcli.data.images import DEFAULT_MAX_PIXELS, Canvas, ImageDecodeError, decode_full_bgr, decode_photo
from segcli.data.sources import Source, SourceList
from segcli.errors import one_line
from segcli.fileio import atomic_write_bytes
from segcli.labels import LabelSet
from segcli.masks import label_fractions, mask_dtype
from segcli.outputs import DEFAULT_OUTPUTS, OUTPUT_KINDS, RenderInput
from segcli.render import color_lut, palette_array, scratch
from segcli.runfolder import RunFolder, error_record, merge_summaries  # noqa: F401  (merge: part of the API)


@dataclass
class PredictOptions:
    labels: LabelSet
    prompt: str | None = None
    output: Path | None = None  # None: a new runs/predict/N
    save: tuple[str, ...] = DEFAULT_OUTPUTS
    alpha: float = 0.5
    batch_size: int = 8
    workers: int = 2
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard: tuple[int, int] | None = None  # (I, N): this run is shard I of N, writing into a shared DIR


@dataclass
class PredictResult:
    output: Path
    records: list[dict]
    summary: dict
    failed: int = 0
    reused: int = 0
    interrupted: bool = False


@dataclass
class Item:
    """One input on its way through the stages."""

    index: int
    source: Source
    canvas: Canvas | None = None
    full_hw: tuple[int, int] = (0, 0)
    photo: np.ndarray | None = None  # full-size BGR, only when an output kind needs it
    seconds: float = 0.0
    error: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)


class _InputFailure(Exception):
    """An input whose outputs could not be produced; recorded, the run goes on."""


class PredictRun:
    """One `segcli predict` run over a list of sources."""

    def __init__(self, segmenter: Segmenter, options: PredictOptions, sources: SourceList,
                 on_record: Callable[[dict], None] | None = None):
        self.seg = segmenter
        self.opt = options
        self.sources = sources
        self.on_record = on_record or (lambda record: None)
        self.palette = palette_array(options.labels)
        self.lut = color_lut(self.palette) if len(options.labels) <= 256 else None
        self.need_photo = any(OUTPUT_KINDS[k].needs_photo for k in options.save)
        settings = {
            "model": segmenter.name,
            "model_fingerprint": segmenter.fingerprint,
            "labels": options.labels.to_json(),
            "prompt": options.prompt,
            "imgsz": segmenter.imgsz,
            "precision": str(segmenter.autocast_dtype or torch.float32).replace("torch.", ""),
            "save": list(options.save),
            "alpha": options.alpha,
        }
        self.folder = RunFolder(options.output, settings, options.save, options.shard, options.overwrite)
        self.output = self.folder.path
        self.records: dict[int, dict] = {}

    # -- the stages ---------------------------------------------------------------------------

    def decode(self, item: Item) -> Item:
        """File -> model canvas. Errors are kept.

        The canvas always comes from a DCT-reduced decode (cheap, and the label map does not depend
        on which outputs are written); the full-size photo is decoded later, in `finish`, only for
        overlays, so at most one full-size photo per worker is in memory."""
        t0 = time.perf_counter()
        if item.source.error:
            item.error = item.source.error
            return item
        try:
            decoded = decode_photo(item.source.path, self.opt.max_pixels, draft_long_side=self.seg.imgsz)
            item.canvas, item.full_hw = self.seg.prepare(decoded.image), decoded.full_hw
        except ImageDecodeError as exc:
            item.error = str(exc)
        except MemoryError:
            item.error = "out of memory while decoding"
        except Exception as exc:  # a decoder bug on a strange file must not stop the batch
            item.error = f"cannot decode image: {type(exc).__name__}: {one_line(str(exc))}"
        item.seconds = time.perf_counter() - t0
        return item

    def infer(self, batch: list[Item], text: torch.Tensor | None) -> None:
        """A batch of canvases -> logits per item at model resolution."""
        t0 = time.perf_counter()
        logits, _ = self.seg.segment_canvases(np.stack([it.canvas.pixels for it in batch]), text)
        share = (time.perf_counter() - t0) / len(batch)
        for i, item in enumerate(batch):
            item.logits, item.canvas.pixels = logits[i], None
            item.seconds += share

    def restore(self, item: Item) -> np.ndarray:
        """Logits -> label map [H,W] at the photo's full size (in this thread's reused buffer)."""
        buffer = scratch("mask", item.full_hw, mask_dtype(len(self.opt.labels)))
        mask = self.seg.label_map(item.logits, item.canvas, item.full_hw, out=buffer)
        item.logits = None
        return mask

    def render(self, item: Item, mask: np.ndarray) -> tuple[dict[str, bytes], np.ndarray, list[int]]:
        """Label map -> the encoded bytes of every requested output kind."""
        fractions = label_fractions(mask, len(self.opt.labels))
        present = [int(k) for k in np.argsort(-fractions, kind="stable") if fractions[k] > 0]  # most pixels first
        given = RenderInput(mask=mask, labels=self.opt.labels, palette=self.palette, present=present,
                            alpha=self.opt.alpha, photo=item.photo, lut=self.lut)
        item.photo = None
        return {kind: OUTPUT_KINDS[kind].produce(given) for kind in self.opt.save}, fractions, present

    def write(self, item: Item, blobs: dict[str, bytes]) -> dict[str, Path]:
        """Each output atomically into its place inside DIR (never outside it, symlinks included)."""
        paths = self.folder.outputs(item.source)
        folder = next(iter(paths.values())).parent
        folder.mkdir(parents=True, exist_ok=True)
        if not self.folder.inside(folder):
            raise _InputFailure(f"output folder {folder} leads outside {self.output} (symlink); not written")
        for kind, path in paths.items():
            atomic_write_bytes(path, blobs[kind])
        return paths

    def finish(self, item: Item) -> dict:
        """restore -> render -> write for one item (on a worker); returns its record."""
        t0 = time.perf_counter()
        if self.need_photo:
            try:
                item.photo = decode_full_bgr(item.source.path, self.opt.max_pixels)
            except ImageDecodeError as exc:  # the file changed since it was first read
                raise _InputFailure(str(exc)) from None
            if item.photo.shape[:2] != item.full_hw:
                raise _InputFailure("the file changed while it was being processed")
        mask = self.restore(item)
        blobs, fractions, present = self.render(item, mask)
        paths = self.write(item, blobs)
        src = item.source
        return {
            "input": src.display,
            "path": str(src.path),
            "output": str(src.rel),
            "status": "ok",
            "width": int(mask.shape[1]),
            "height": int(mask.shape[0]),
            "seconds": round(item.seconds + time.perf_counter() - t0, 4),
            "labels": {self.opt.labels.names[k]: round(float(fractions[k]), 6) for k in present},
            "files": [str(p.relative_to(self.output)) for p in paths.values()],
        }

    # -- the stream ---------------------------------------------------------------------------

    def _done(self, index: int, record: dict) -> None:
        self.records[index] = record
        self.folder.record(record)
        self.on_record(record)

    def _collect(self, writing: deque, limit: int) -> None:
        """Record finished writes (all that are done, and more until at most `limit` are pending)."""
        while writing and (len(writing) > limit or writing[0][1].done()):
            item, fut = writing.popleft()
            if fut.cancelled():  # interrupted before it started: not done, the next run does it
                continue
            try:
                self._done(item.index, fut.result())
            except _InputFailure as exc:
                self._done(item.index, error_record(item.source, str(exc)))
            except OSError as exc:
                self._done(item.index, error_record(item.source, f"cannot write outputs: {exc.strerror or exc}"))
            except (MemoryError, ValueError, RuntimeError) as exc:
                self._done(item.index, error_record(item.source, f"failed: {type(exc).__name__}: {one_line(str(exc))}"))

    def run(self) -> PredictResult:
        # host work is parallel across images (the workers), not inside one: OpenCV's own thread pool
        # would only add overhead per image and fight the workers for the cores
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return self._run()
        finally:
            cv2.setNumThreads(threads)

    def _run(self) -> PredictResult:
        done = self.folder.open()
        text = self.seg.label_embeddings(self.opt.labels, self.opt.prompt)  # once per run
        todo: list[Item] = []
        reused = 0
        for index, source in enumerate(self.sources.sources):
            previous = self.folder.reusable(source, done)
            if previous is not None:
                self.records[index] = previous
                reused += 1
                self.on_record(previous)
            else:
                todo.append(Item(index, source))

        # one pool of `workers` threads does all host work per image (decode, then restore, render and
        # write), so --workers is how many cores the host side uses besides the model's thread
        workers = max(1, self.opt.workers)
        window = self.opt.batch_size * 2 + workers
        pool = ThreadPoolExecutor(workers, thread_name_prefix="segcli-host")
        decoding: deque[Future] = deque()
        writing: deque[tuple[Item, Future]] = deque()
        pending = iter(todo)
        interrupted = False

        def refill() -> None:
            while len(decoding) < window and (item := next(pending, None)) is not None:
                decoding.append(pool.submit(self.decode, item))

        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            refill()
            batch: list[Item] = []
            while decoding:
                item = decoding.popleft().result()
                refill()
                self._collect(writing, limit=window)
                if item.error:
                    self._done(item.index, error_record(item.source, item.error))
                else:
                    batch.append(item)
                if len(batch) == self.opt.batch_size or (not decoding and batch):
                    self.infer(batch, text)
                    writing.extend((it, pool.submit(self.finish, it)) for it in batch)
                    self._collect(writing, limit=window)
                    batch = []
            self._collect(writing, limit=0)
        except KeyboardInterrupt:
            interrupted = True
            for fut in decoding:
                fut.cancel()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # running writes finish: files stay whole
            self._collect(writing, limit=0)
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

        ordered = [self.records[i] for i in sorted(self.records)]
        summary = self.folder.close(ordered, len(self.sources.sources), reused, interrupted, self.sources.skipped,
                                    self.opt.labels.to_json())
        failed = sum(1 for r in ordered if r["status"] != "ok")
        return PredictResult(self.output, ordered, summary, failed=failed, reused=reused, interrupted=interrupted)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
