"""The host-side stages of predict, run by worker processes: decode, then restore, render and write.

Nothing here imports torch, so a worker starts in a fraction of a second and holds no model. The
worker processes are single-threaded: work on one image never fights another for the GIL, so
--workers N really uses N cores. What crosses between the model process and a worker is small: a
path in, a model-size canvas out; then the candidate labels' logits in, a record out (as
segcli.pipeline.parcels, so that a worker killed halfway through cannot hang the run). The full-size photo
(for overlays) is decoded by the worker that blends it, when it blends it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from segcli.errors import one_line
from segcli.files.atomic import atomic_write_bytes
from segcli.inputs.geometry import Protocol, draft_size, model_pixels, model_size
from segcli.inputs.images import ImageDecodeError, decode_full_bgr, decode_photo
from segcli.inputs.jpeg_probe import JpegProbe, probe_jpeg
from segcli.inputs.sources import Source
from segcli.pipeline import parcels
from segcli.postprocess.label_map import mask_dtype, restore_label_map
from segcli.postprocess.outputs import OUTPUT_KINDS, VIDEO_OUTPUTS, RenderInput
from segcli.postprocess.render import blend_table, color_lut, palette_array, png_rows, scratch
from segcli.vocabulary.labels import LabelSet


class InputFailure(Exception):
    """An input whose outputs could not be produced; recorded, the run goes on."""


@dataclass(frozen=True)
class HostPlan:
    """Everything a worker needs for any image of one run (sent to each worker once)."""

    labels: LabelSet
    kinds: tuple[str, ...]
    alpha: float
    imgsz: int
    max_pixels: int
    output: Path  # DIR
    output_real: Path  # DIR with symlinks resolved: nothing is written outside it
    protocol: Protocol = Protocol()  # one canvas, or the image resized for sliding windows

    @cached_property
    def palette(self) -> np.ndarray:
        return palette_array(self.labels)

    @cached_property
    def lut(self) -> np.ndarray | None:
        return color_lut(self.palette) if len(self.labels) <= 256 else None

    @cached_property
    def blend(self) -> np.ndarray | None:
        return blend_table(self.lut, self.alpha) if self.lut is not None else None

    @property
    def need_photo(self) -> bool:
        return any(OUTPUT_KINDS[k].needs_photo for k in self.kinds)

    def outputs(self, source: Source) -> dict[str, Path]:
        """Where each requested output of `source` goes: DIR/REL + the kind's suffix (a video's:
        VIDEO_OUTPUTS, with its per-frame CSV)."""
        base = self.output / Path(*source.rel.parent.parts)
        if source.video:
            kinds = [k for k in self.kinds if k in VIDEO_OUTPUTS] + ["labels"]
            return {kind: base / (source.rel.name + VIDEO_OUTPUTS[kind]) for kind in kinds}
        return {kind: base / (source.rel.name + OUTPUT_KINDS[kind].suffix) for kind in self.kinds}


@dataclass
class ModelInput:
    """What decoding sends back: the model input and the sizes needed to undo the fit."""

    pixels: np.ndarray | None  # [S,S,3] uint8 canvas, the image at its top-left; or [h,w,3], the image (windows)
    resized_hw: tuple[int, int]
    full_hw: tuple[int, int]
    seconds: float
    stamp: tuple[int, int] | None  # the file's (size, mtime) when read (None for bytes), to notice a change
    jpeg: bytes | None = None  # device decoding: the file's bytes, for the model's process to decode (pixels None)
    probe: JpegProbe | None = None  # ... and their header facts


@dataclass
class FinishJob:
    """What the model sends to a worker for one image."""

    source: Source
    candidates: np.ndarray | None  # [P] label indices that can appear (None: all, for the device path)
    logits: np.ndarray  # [P,h,w] their logits over the image's cells (the device path: [K,h,w] there)
    valid_hw: tuple[float, float]  # the image's exact extent in cells
    full_hw: tuple[int, int]
    seconds: float  # spent on it so far
    stamp: tuple[int, int] | None  # from ModelInput (None: not known, the photo is not checked)
    made: dict[str, bytes] | None = None  # outputs the model's process made (the pixel embeddings)
    photo_optional: bool = False  # a photo gone or changed drops the outputs that need it, not the input


_plan: HostPlan | None = None
_stderr_captured = False  # fd 2 is this worker's stderr file (stderr_file)


def stderr_file(owner: str, pid: int) -> Path:
    """Where the worker `pid` of the run `owner` has its stderr: what native libraries print there
    (libtiff's "Fax4Decode: Bad code word", glibc's "double free") stays off the terminal and goes
    with the input it is about. One of the run's parcel files, so the run's sweep removes it."""
    return parcels.FOLDER / f"{parcels.PREFIX}{owner}-stderr-{pid}"


def _capture_stderr(owner: str) -> None:
    global _stderr_captured
    try:
        fd = os.open(stderr_file(owner, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    except OSError:  # nowhere to put it: stderr stays the terminal
        return
    os.dup2(fd, 2)
    os.close(fd)
    _stderr_captured = True


@contextmanager
def _native_messages():
    """Starts the task's stderr afresh; an exception that ends it carries what was printed (`.native`)."""
    if _stderr_captured:
        os.ftruncate(2, 0)  # O_APPEND: writes go on at the new end
    try:
        yield
    except Exception as exc:
        if _stderr_captured:
            try:
                text = os.pread(2, 4096, 0).decode(errors="replace").strip()
            except OSError:
                text = ""
            if text:
                exc.native = text
        raise


def start_worker(plan: HostPlan, parent_pid: int, parcel_owner: str) -> None:
    """Worker initializer. Interrupts are the main process's to handle: it lets running jobs finish
    (their files stay whole) and cancels the rest. If the main process is killed outright (kill -9,
    the OOM killer), the worker ends itself: its queue would never close, so it would wait forever.
    `parcel_owner`: the run whose files (segcli.pipeline.parcels) it writes."""
    global _plan
    _plan = plan
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one image per core: OpenCV's own threads would only add overhead
    parcels.serve_for(parcel_owner)
    _capture_stderr(parcel_owner)
    faulthandler.enable()  # a native crash prints the Python stack into the stderr file: the input's record
    from segcli.postprocess.kernels import warm_up

    warm_up()  # done already where the forkserver preloaded it; with spawn, each worker loads it here
    threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True, name="segcli-parent-watch").start()


def _exit_with(pid: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # a process of another user took the pid: ours is gone
            os._exit(1)


def decode(path: Path | bytes, plan: HostPlan | None = None) -> ModelInput:
    """File (or its bytes) -> model canvas, from a DCT-reduced decode (cheap; the label map then does
    not depend on which outputs are written). Raises ImageDecodeError with a one-line message."""
    plan = plan or _plan
    t0 = time.perf_counter()
    with _native_messages():
        try:
            stamp = None if isinstance(path, bytes) else file_stamp(path)
            decoded = decode_photo(path, plan.max_pixels,
                                   draft_long_side=lambda w, h: draft_size(w, h, plan.imgsz, plan.protocol))
            pixels, resized_hw = model_pixels(decoded.image, plan.imgsz, plan.protocol)
        except MemoryError:
            raise ImageDecodeError("out of memory while decoding") from None
        except FileNotFoundError:  # deleted since the folder was listed
            raise ImageDecodeError("file not found (deleted since the inputs were listed)") from None
        except ImageDecodeError:
            raise
        except Exception as exc:  # a decoder bug on a strange file must not stop the batch
            raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {one_line(str(exc))}") from None
    return ModelInput(pixels, resized_hw, decoded.full_hw, time.perf_counter() - t0, stamp)


def read_for_device(path: Path, plan: HostPlan | None = None) -> ModelInput:
    """Device decoding's first step (segcli.pipeline.device_inputs): a plain JPEG's bytes and header
    facts, for the model's process to decode in a batch on its device; any other file (PNG,
    progressive, CMYK, a damaged header...) decoded here, as `decode` does."""
    plan = plan or _plan
    t0 = time.perf_counter()
    try:
        stamp = file_stamp(path)
        data = Path(path).read_bytes()
    except OSError:
        return decode(path, plan)  # its error, worded as the host path words it
    if len(data) != stamp[0]:  # changed while read: decoded afresh, with a new stamp
        return decode(path, plan)
    probe = probe_jpeg(data, plan.max_pixels)
    if probe is None:  # not for the device: decoded here from the bytes read
        got = decode(data, plan)
        got.stamp = stamp
        return got
    h, w = probe.upright_hw
    rw, rh = model_size(w, h, plan.imgsz, plan.protocol)
    return ModelInput(None, (rh, rw), (h, w), time.perf_counter() - t0, stamp, jpeg=data, probe=probe)


def file_stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def reread(path: Path, stamp: tuple[int, int] | None) -> bytes:
    """The photo's bytes again (for the full-size outputs), when the file is still the one decoded:
    a photo replaced, truncated or deleted meanwhile fails as an input, never mixes two files."""
    try:
        data = Path(path).read_bytes()
        now = file_stamp(path)
    except OSError as exc:
        raise InputFailure(f"the file went away while it was being processed ({exc.strerror or exc})") from None
    if stamp is not None and (now != stamp or len(data) != stamp[0]):
        raise InputFailure("the file changed while it was being processed; run again to redo it")
    return data


def finish(job: FinishJob, plan: HostPlan | None = None) -> dict:
    """restore -> render -> write for one image; returns its record."""
    with _native_messages():
        return _finish(job, plan or _plan)


def _finish(job: FinishJob, plan: HostPlan) -> dict:
    t0 = time.perf_counter()
    photo, warning = None, None
    if plan.need_photo:
        try:
            photo = decode_full_bgr(reread(job.source.path, job.stamp), plan.max_pixels)
        except (ImageDecodeError, InputFailure) as exc:
            if not job.photo_optional:
                raise InputFailure(str(exc)) from None
            warning = f"no {', '.join(k for k in plan.kinds if OUTPUT_KINDS[k].needs_photo)}: {exc}"
    counts = np.zeros(len(plan.labels), np.int64)
    rows = png_rows(job.full_hw) if mask_dtype(len(plan.labels)) == np.uint8 else None
    mask = restore(job, plan, counts, out=rows[:, 1:] if rows is not None else None)
    return complete(job.source, mask, counts, plan, job.seconds + time.perf_counter() - t0, photo, job.made, warning,
                    mask_rows=rows)


def complete(source: Source, mask: np.ndarray, counts: np.ndarray, plan: HostPlan, seconds: float,
             photo: np.ndarray | None = None, made: dict[str, bytes] | None = None, warning: str | None = None,
             mask_rows: np.ndarray | None = None) -> dict:
    """render -> write for a restored label map and its pixels per label (`counts`, counted while
    restoring); `made` holds outputs produced elsewhere (the device's overlay, the model's embeddings).
    Without `photo`, the kinds that need it are left out (`warning` says why). `mask_rows`: the PNG
    rows the map lies in (render.png_rows). Returns the record."""
    t0 = time.perf_counter()
    made = made or {}
    kinds = [k for k in plan.kinds if k not in made and (photo is not None or not OUTPUT_KINDS[k].needs_photo)]
    blobs, fractions, present = render(mask, counts, photo, plan, kinds, mask_rows)
    paths = write(source, {**blobs, **made}, plan)
    record = {
        "input": source.display,
        "path": source.recorded_path,
        "output": str(source.rel),
        "status": "ok",
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "seconds": round(seconds + time.perf_counter() - t0, 4),
        "labels": {plan.labels.names[k]: round(float(fractions[k]), 6) for k in present},
        "files": [str(p.relative_to(plan.output)) for p in paths.values()],
    }
    if warning:
        record["warning"] = warning
    return record


def restore(job: FinishJob, plan: HostPlan, counts: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Candidate logits -> label map [H,W] at the photo's full size, in `out` or this worker's reused buffer."""
    buffer = out if out is not None else scratch("mask", job.full_hw, mask_dtype(len(plan.labels)))
    return restore_label_map(job.logits, job.valid_hw, job.full_hw, out=buffer, num_labels=len(plan.labels),
                             candidates=job.candidates, histogram=counts)


def present_labels(counts: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Pixels per label -> (fraction of pixels per label, the labels present, most pixels first)."""
    fractions = counts / max(1, int(counts.sum()))
    return fractions, [int(k) for k in np.argsort(-fractions, kind="stable") if fractions[k] > 0]


def render(mask: np.ndarray, counts: np.ndarray, photo: np.ndarray | None, plan: HostPlan,
           kinds: list[str], mask_rows: np.ndarray | None = None) -> tuple[dict[str, bytes], np.ndarray, list[int]]:
    """Label map (and its pixels per label; the PNG rows it lies in) -> the encoded bytes of each of `kinds`."""
    fractions, present = present_labels(counts)
    given = RenderInput(mask=mask, labels=plan.labels, palette=plan.palette, present=present, alpha=plan.alpha,
                        photo=photo, lut=plan.lut, blend=plan.blend if photo is not None else None,
                        mask_rows=mask_rows)
    return {kind: OUTPUT_KINDS[kind].produce(given) for kind in kinds}, fractions, present


def make_output_folder(folder: Path, plan: HostPlan) -> None:
    """Create `folder` for an input's outputs; InputFailure when it resolves outside DIR (a symlink)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = folder.resolve()
    if real != plan.output_real and plan.output_real not in real.parents:
        raise InputFailure(f"output folder {folder} leads outside {plan.output} (symlink); not written")


def write(source: Source, blobs: dict[str, bytes], plan: HostPlan) -> dict[str, Path]:
    """Each output in `blobs` atomically into its place inside DIR (never outside it, symlinks
    included); returns where they went."""
    paths = {kind: path for kind, path in plan.outputs(source).items() if kind in blobs}
    make_output_folder(next(iter(paths.values())).parent, plan)
    for kind, path in paths.items():
        atomic_write_bytes(path, blobs[kind])
    return paths
