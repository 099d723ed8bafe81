"""The serving core without HTTP: one model, a bounded queue and a batcher, the request-level work.

    request thread: read the upload, decode it to the model's input (predict's `host.decode`: a
      canvas, or the photo resized for the model's sliding windows)
      -> the bounded queue -> the model thread: up to --batch-size requests that arrived within
         --batch-window ms, one forward pass per label set (predict's `segment_images`, then
         PAMR where predict refines by default)
      -> request thread: label map, PNG/JPEG (predict's `restore_label_map` and `host.render`)

Every step is predict's own code, so an image output is the bytes `segcli predict` writes for that
photo with the same model, labels and settings (predict batches too: like predict with
--batch-size 1, a lone request gives exactly those bytes; in a batch, bf16 kernels may round the
last bits differently, as in predict). A full queue answers 503 with Retry-After. The HTTP face
is segcli.serve.app.
"""

from __future__ import annotations

import base64
import functools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segcli.errors import SegcliError, one_line
from segcli.inference.segmenter import Segmenter
from segcli.inputs.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_full_bgr
from segcli.pipeline import host
from segcli.postprocess.label_map import restore_label_map
from segcli.version import __version__
from segcli.vocabulary.labels import LabelSet, parse_labels, prompt_templates

OUTPUTS = {"json": "application/json", "mask": "image/png", "color": "image/png", "overlay": "image/jpeg"}


@dataclass
class ServeOptions:
    labels: LabelSet | None = None  # the default labels (else the model's own)
    prompt: str | None = None
    batch_size: int = 8
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests waiting for the model; beyond it: 503
    max_upload_mb: float = 25.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    alpha: float = 0.5
    api_key: str | None = None
    request_timeout_s: float = 120.0


class ServeError(Exception):
    """A request's failure: its HTTP status and one sentence for {"error": ...}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Job:
    pixels: np.ndarray  # the model's input: [S,S,3] uint8 canvas, or the resized photo for windows
    resized_hw: tuple[int, int]
    labels: LabelSet
    prompt: str | None
    done: threading.Event = field(default_factory=threading.Event)
    logits: object = None  # torch [K,h',w'] fp32 on the CPU, finished (Segmenter.finish_logits)
    valid_hw: tuple[float, float] = (0.0, 0.0)  # the photo's extent in their cells
    error: BaseException | None = None


class Batcher:
    """The model thread: batches of waiting requests, one forward pass per label set in a batch."""

    def __init__(self, seg: Segmenter, batch_size: int, window_s: float, queue_size: int):
        self.seg, self.batch_size, self.window_s = seg, batch_size, window_s
        self.refiner = seg.refiner_for("auto")  # as predict refines by default (PAMR for naclip)
        self.jobs: queue.Queue[_Job | None] = queue.Queue(queue_size)
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="segcli-model")
        self.thread.start()

    def submit(self, job: _Job) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, deadline, closing = [first], time.monotonic() + self.window_s, False
            while len(batch) < self.batch_size:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                batch.append(job)
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.labels.synonyms, job.prompt), []).append(job)
            for group in groups.values():
                self._run(group)
            self.batches += 1
            if closing:
                return

    def _run(self, group: list[_Job]) -> None:
        try:
            text = self.seg.label_embeddings(group[0].labels, group[0].prompt)
            finished, _ = self.seg.runner.segment_finished([job.pixels for job in group], [job.resized_hw for job in group],
                                                    text, self.batch_size, self.refiner,  # predict's protocol
                                                    self.seg.label_groups(group[0].labels))
            for job, (logits_i, job.valid_hw) in zip(group, finished):
                job.logits = logits_i.cpu()
        except BaseException as exc:  # one bad batch must not end the model thread
            for job in group:
                job.error = exc
        finally:
            for job in group:
                job.done.set()


class Service:
    """What the routes call: one model, its batcher, the request-level work."""

    def __init__(self, seg: Segmenter, options: ServeOptions):
        self.seg, self.opt = seg, options
        self.default_labels = options.labels or seg.default_labels
        self.batcher = Batcher(seg, options.batch_size, options.batch_window_ms / 1000, options.queue_size)
        self.draining = False
        self.served = 0
        # one HostPlan per label set in use: its colors and the overlay's blend table are made once
        self._plan = functools.lru_cache(maxsize=32)(self._make_plan)

    def _make_plan(self, labels: LabelSet) -> host.HostPlan:
        return host.HostPlan(labels, ("mask", "color", "overlay"), self.opt.alpha, self.seg.imgsz, self.opt.max_pixels,
                             Path("."), Path("."), self.seg.protocol)

    def info(self) -> dict:
        labels = self.default_labels
        return {"segcli_version": __version__, "model": self.seg.name, "architecture": self.seg.model.architecture,
                "family": self.seg.model.capabilities.family, "imgsz": self.seg.imgsz,
                "protocol": self.seg.protocol.describe(), "refine": "pamr" if self.batcher.refiner is not None else "none",
                "default_labels": list(labels.names) if labels else None,
                "open_vocabulary": self.seg.model.open_vocabulary, "device": str(self.seg.device),
                "batch_size": self.opt.batch_size, "outputs": list(OUTPUTS),
                "max_upload_mb": self.opt.max_upload_mb, "max_pixels": self.opt.max_pixels}

    def labels(self, text: str | None) -> LabelSet:
        if text is None or not text.strip():
            if self.default_labels is None:
                raise ServeError(400, "no labels given and the server has no default labels: send labels=road,car,sky")
            return self.default_labels
        try:
            return self.seg.resolve_labels(parse_labels(text, allow_files=False))
        except SegcliError as exc:
            raise ServeError(400, str(exc)) from None

    def segment(self, data: bytes, labels_text: str | None, prompt: str | None, output: str) -> tuple[bytes, str]:
        """One upload -> (response body, media type)."""
        if output not in OUTPUTS:
            raise ServeError(400, f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        try:
            prompt_templates(prompt or None)
        except SegcliError as exc:
            raise ServeError(400, str(exc)) from None
        labels = self.labels(labels_text)
        plan = self._plan(labels)
        try:
            got = host.decode(data, plan)
        except ImageDecodeError as exc:
            raise _decode_failure(exc) from None
        job = _Job(got.pixels, got.resized_hw, labels, prompt or None)
        if not self.batcher.submit(job):
            raise ServeError(503, "the server is busy (queue full): retry shortly", {"Retry-After": "1"})
        if not job.done.wait(self.opt.request_timeout_s):
            raise ServeError(503, "the model did not answer in time: retry shortly", {"Retry-After": "5"})
        if job.error is not None:
            if isinstance(job.error, SegcliError):
                raise ServeError(400, str(job.error))
            raise ServeError(500, f"the model failed on this request: {type(job.error).__name__}: {one_line(str(job.error))}")
        counts = np.zeros(len(labels), np.int64)
        mask = restore_label_map(job.logits, job.valid_hw, got.full_hw, histogram=counts, groups=self.seg.label_groups(labels))
        kind = "mask" if output == "json" else output
        photo = None
        if kind == "overlay":
            try:
                photo = decode_full_bgr(data, self.opt.max_pixels)
            except ImageDecodeError as exc:
                raise _decode_failure(exc) from None
        blobs, fractions, present = host.render(mask, counts, photo, plan, [kind])
        self.served += 1
        if output != "json":
            return blobs[kind], OUTPUTS[output]
        body = {"labels": list(labels.names), "colors": [list(c) for c in labels.colors],
                "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                "fractions": {labels.names[k]: round(float(fractions[k]), 6) for k in present},
                "mask_png": base64.b64encode(blobs["mask"]).decode("ascii")}
        return json.dumps(body).encode(), OUTPUTS["json"]


def _decode_failure(exc: ImageDecodeError) -> ServeError:
    status = {"too_large": 413, "not_image": 415}.get(exc.reason, 400)
    return ServeError(status, str(exc))
