"""The predict engine: a stream of named stages from SOURCE files to outputs in a run folder.

    decode (worker processes, bounded window) -> infer (this process, batches)
      -> restore (label map at the photo's size) -> render (one entry of OUTPUT_KINDS each) -> write
         (the same worker processes, bounded)

Memory depends on the batch size and window, never on the number of inputs. The host stages live in
`segcli.pipeline.host` (torch-free, run by the workers); the run folder's bookkeeping (settings check,
records, summaries) is `segcli.pipeline.run_folder.RunFolder`; what each output kind is and how it is made is
the table `segcli.postprocess.outputs.OUTPUT_KINDS`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from segcli.embeddings.format import dtype_name
from segcli.errors import SegcliError, one_line
from segcli.files.atomic import is_disk_error, remove_stale_temp_files
from segcli.inference.segmenter import Segmenter
from segcli.inputs.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from segcli.inputs.sources import Source, SourceList
from segcli.pipeline import host, parcels
from segcli.pipeline.device_inputs import DeviceInputs, decodes_on_device
from segcli.pipeline.model_step import Item, ModelStep
from segcli.pipeline.run_folder import RunFolder, error_record
from segcli.pipeline.workers import WorkerCrashed, WorkerPool, default_workers, worker_context
from segcli.postprocess.outputs import DEFAULT_OUTPUTS
from segcli.vocabulary.labels import LabelSet

# A write failure is one input's failure, except when it is the disk's (full, over quota, read-only,
# I/O error: segcli.files.atomic.DISK_ERRNOS), or when the same errno fails this many inputs in a row: then the
# run stops, those inputs stay not done, and the next run finishes the job.
FAILED_WRITES_IN_A_ROW = 8


class OutputWriteError(SegcliError):
    """The run stopped because its output folder stopped taking writes (exit status 2)."""


@dataclass
class RunOptions:
    labels: LabelSet
    prompt: str | None = None
    output: Path | None = None  # None: a new runs/predict/N
    save: tuple[str, ...] = DEFAULT_OUTPUTS
    alpha: float = 0.5
    batch_size: int = 8
    workers: int | None = None  # None: 2 when the model runs on the CPU, else all cores but one (at most 16)
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard: tuple[int, int] | None = None  # (I, N): this run is shard I of N, writing into a shared DIR
    postprocess: str = "host"  # where full-size work happens: host (worker processes) or device; auto = host
    decode: str = "auto"  # where plain JPEGs are decoded: host (workers), device (batches), auto: device on a GPU
    embed_dtype: str = "auto"  # the stored pixel embeddings' dtype (see segcli.embeddings.format)
    embed_stride: int | None = None  # their stride in input pixels (None: the model's output stride)
    refine: str = "auto"  # "pamr", "none", or auto: PAMR for the methods whose published numbers use it (naclip)
    vid_stride: int = 1  # videos: every N-th frame
    smooth: float = 0.0  # videos: weight of the running average in each frame's logits (0: off)


@dataclass
class PredictResult:
    output: Path
    records: list[dict]
    summary: dict
    failed: int = 0
    reused: int = 0
    interrupted: bool = False


class JobSource(Protocol):
    """Where a run's inputs come from on their way to the host workers: per input, the FinishJob
    the workers complete (restore, render, write), or None with `item.error` set. Photos decoded
    and run through the model (PhotoJobs, the default), or stored embeddings (relabel's)."""

    def jobs(self, run: "PredictRun", todo: list[Item], pool: WorkerPool, text: torch.Tensor | None,
             window: int) -> Iterator[tuple[Item, host.FinishJob | None]]: ...


class Stager(Protocol):
    """Makes inputs readable just before they are decoded (object-storage inputs, segcli.pipeline.remote)."""

    def restrict(self, sources: list[Source]) -> None: ...  # the inputs that will be prepared
    def prepare(self, source: Source) -> None: ...  # SegcliError: this input cannot be fetched


class PredictRun:
    """One `segcli predict` run over a list of sources.

    Its collaborators come in through the constructor: `inputs` (a JobSource; PhotoJobs by
    default), `engine` (something with `run(run, done) -> PredictResult` that schedules the
    photos itself, such as Ray's; None: this machine's worker processes), `stager` (remote
    inputs), `exists` (whether an output is still there: an object store's listing for a URL),
    `settings` (more of what the run folder records and checks)."""

    def __init__(self, segmenter: Segmenter, options: RunOptions, sources: SourceList, *,
                 on_record: Callable[[dict], None] | None = None, on_frames: Callable[[int], None] | None = None,
                 inputs: JobSource | None = None, engine=None, stager: Stager | None = None,
                 exists: Callable[[Path], bool] | None = None, settings: dict | None = None):
        if options.postprocess not in ("auto", "host", "device"):
            raise SegcliError(f"--postprocess {options.postprocess!r}: use host or device")
        if options.vid_stride < 1 or not 0.0 <= options.smooth < 1.0:
            raise SegcliError("--vid-stride takes 1 or more, --smooth a weight from 0 (off) to below 1")
        self.on_frames = on_frames
        self.inputs = inputs or PhotoJobs()
        self.engine = engine
        self.stager = stager
        self.seg = segmenter
        self.opt = options
        self.sources = sources
        self.on_record = on_record or (lambda record: None)
        # the host's worker processes, unless asked: the device path runs one photo at a time in
        # this process, which feeds a fast GPU far slower than the workers do (docs: performance)
        on_device = options.postprocess == "device" and segmenter.model.capabilities.exportable
        self.step = ModelStep(segmenter, options, all_logits=on_device)  # the model's stage (also what a Ray actor runs)
        self.embed, self.refiner, self.groups = self.step.embed, self.step.refiner, self.step.groups
        self.folder = RunFolder(options.output, {**self._settings(), **(settings or {})}, options.shard,
                                options.overwrite, exists=exists)
        self.output = self.folder.path
        self.plan = host.HostPlan(options.labels, tuple(options.save), options.alpha, segmenter.imgsz,
                                  options.max_pixels, self.folder.path, self.folder.real, segmenter.protocol)
        self.records: dict[int, dict] = {}
        self.stop: OSError | None = None  # the write failure that ended the run early
        self._failed_writes: list[int | None] = []  # errnos of the write failures since the last success
        self.device_post = None
        if on_device:  # a PyTorch model: its logits are on its device
            from segcli.pipeline.device_post import DevicePostprocess

            self.device_post = DevicePostprocess(self.plan, segmenter.device, self.groups)
        self.pool: WorkerPool | None = None  # the worker processes, while the run runs
        self.device_inputs = None  # JPEGs decoded on the device, when they are
        if decodes_on_device(options.decode, segmenter):
            self.device_inputs = DeviceInputs(segmenter, self._decode_on_host)

    def _settings(self) -> dict:
        """What the run folder records and a later run must match."""
        seg, options = self.seg, self.opt
        settings = {
            "model": seg.name,
            "model_fingerprint": seg.fingerprint,
            "labels": options.labels.to_json(),
            "prompt": options.prompt,
            "imgsz": seg.imgsz,
            "precision": seg.precision_name,
            "save": list(options.save),
            "alpha": options.alpha,
        }
        if self.embed is not None:
            settings["embeddings"] = {"dtype": dtype_name(self.embed[0]), "stride": self.embed[1]}
        if self.refiner is not None:
            settings["refine"] = "pamr"
        if self.groups is not None:
            settings["synonyms"] = "max"
        if seg.bg_threshold is not None:
            settings["bg_threshold"] = seg.bg_threshold
        if seg.protocol.sliding:
            settings["protocol"] = seg.protocol.to_json()
        if options.vid_stride != 1 or options.smooth:
            settings["video"] = {"vid_stride": options.vid_stride, "smooth": options.smooth}
        return settings

    # -- the stream ---------------------------------------------------------------------------

    def _done(self, index: int, record: dict) -> None:
        self.records[index] = record
        if record["status"] == "ok":
            self._failed_writes.clear()
        try:
            self.folder.record(record)
        except OSError as exc:  # without its records the run cannot tell what it did: stop
            self.stop = self.stop or exc
        self.on_record(record)

    def _write_failed(self, item: Item, exc: OSError) -> None:
        """An input's outputs could not be written: its failure, or the end of the run (see above)."""
        if self.stop is not None:
            return  # written while stopping: not the input's fault, the next run does it
        self._failed_writes.append(exc.errno)
        streak = self._failed_writes[-FAILED_WRITES_IN_A_ROW:]
        if is_disk_error(exc) or (len(streak) == FAILED_WRITES_IN_A_ROW and len(set(streak)) == 1):
            self.stop = exc
            return
        self._done(item.index, error_record(item.source, f"cannot write outputs: {exc.strerror or exc}"))

    def _collect(self, writing: deque, limit: int) -> None:
        """Record finished writes (all that are done, and more until at most `limit` are pending)."""
        while writing and (len(writing) > limit or writing[0][1].done()):
            item, fut = writing.popleft()
            if fut.cancelled():  # interrupted before it started: not done, the next run does it
                continue
            try:
                self._done(item.index, self.pool.result(fut))
            except (host.InputFailure, WorkerCrashed) as exc:
                self._done(item.index, error_record(item.source, str(exc), getattr(exc, "native", None)))
            except OSError as exc:
                self._write_failed(item, exc)
            except BrokenProcessPool:
                raise
            except (MemoryError, ValueError, RuntimeError) as exc:
                self._done(item.index, error_record(item.source, f"failed: {type(exc).__name__}: {one_line(str(exc))}",
                                                    getattr(exc, "native", None)))

    def _prepare(self, item: Item) -> None:
        if self.stager is not None and not item.error:
            try:
                self.stager.prepare(item.source)
            except SegcliError as exc:
                item.error = str(exc)

    def _decoded(self, item: Item, fut: Future) -> Item:
        try:
            item.model_input = self.pool.result(fut)
        except (ImageDecodeError, WorkerCrashed) as exc:
            item.error, item.native = str(exc), getattr(exc, "native", None)
        return item

    def _decode_on_host(self, item: Item) -> Item:
        """A JPEG the device would not decode, decoded by a worker after all (waited for: rare)."""
        item.model_input = None
        return self._decoded(item, self.pool.submit("decoding", host.decode, item.source.path))

    def run(self) -> PredictResult:
        """Every source through the stages. Raises OutputWriteError (after writing what it can of
        the summary) when the output folder stops taking writes."""
        done = self.folder.open()
        try:
            return self.engine.run(self, done) if self.engine is not None else self._run(done)
        finally:
            self.folder.release()

    def _videos(self, videos: list[Item], text: torch.Tensor | None) -> None:
        """Each video through the model in batches of frames, here (segcli.pipeline.video), after the photos."""
        from segcli.pipeline.video import VideoRun

        run = VideoRun(self.seg, self.plan, text, self.opt.batch_size, self.opt.vid_stride, self.opt.smooth, self.on_frames,
                       refiner=self.refiner)
        for item in videos:
            self._prepare(item)
            if item.error:
                self._done(item.index, error_record(item.source, item.error))
                continue
            try:
                self._done(item.index, run.process(item.source))
            except host.InputFailure as exc:
                self._done(item.index, error_record(item.source, str(exc)))
            except OSError as exc:
                self._write_failed(item, exc)
            if self.stop is not None:
                return

    def todo(self, done: dict[str, dict]) -> tuple[list[Item], int]:
        """(the inputs to do, how many finished ones are reused): a finished input whose files are
        all still there is recorded again as it was."""
        todo: list[Item] = []
        reused = 0
        for index, source in enumerate(self.sources.sources):
            previous = self.folder.reusable(source, done, self.plan.outputs(source))
            if previous is not None:
                self.records[index] = previous
                reused += 1
                self.on_record(previous)
            else:
                todo.append(Item(index, source, error=source.error))
        if self.stager is not None:
            self.stager.restrict([item.source for item in todo if not item.error])
        return todo, reused

    def _run(self, done: dict[str, dict]) -> PredictResult:
        context = worker_context()  # its fork server loads the host modules while the text tower runs
        parcels.sweep()  # files left by runs that were killed outright
        owner = parcels.new_owner()  # this run's files
        text = self.seg.label_embeddings(self.opt.labels, self.opt.prompt)  # once per run
        todo, reused = self.todo(done)

        # `workers` single-threaded processes do all host work per image (decode, then restore,
        # render and write): --workers N uses N cores besides the model's, with no GIL between them
        workers = max(1, self.opt.workers or default_workers(self.seg.device))
        window = self.opt.batch_size * 2 + workers
        pool = self.pool = WorkerPool(workers, context, host.start_worker, (self.plan, os.getpid(), owner), owner,
                                      host.stderr_file)
        writers = ThreadPoolExecutor(workers, thread_name_prefix="segcli-write") if self.device_post else None
        writing: deque[tuple[Item, Future]] = deque()
        videos = [item for item in todo if item.source.video and not item.error]  # after the photos, here
        jobs = self.inputs.jobs(self, [item for item in todo if not (item.source.video and not item.error)], pool, text, window)
        interrupted = broken = False
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            for item, job in jobs:
                if job is None:
                    self._done(item.index, error_record(item.source, item.error, item.native))
                else:
                    if writers:
                        fut = self.device_post.finish(job, writers)
                    else:
                        fut = pool.submit("making the outputs of", host.finish, job, packed=True)
                    writing.append((item, fut))
                self._collect(writing, limit=window)
                if self.stop is not None:
                    break
            self._collect(writing, limit=0)
            if videos and self.stop is None:
                self._videos(videos, text)
        except KeyboardInterrupt:
            interrupted = True
        except BrokenProcessPool:
            broken = True
            raise SegcliError("a worker process died (killed, or out of memory); every file written is whole: "
                              "run again to finish") from None
        finally:
            jobs.close()  # cancels the decodes not started
            pool.shutdown()  # running writes finish: files stay whole
            parcels.sweep(owner)  # what nobody read: jobs cancelled, decodes not waited for
            if broken or pool.generation:  # a dead worker cannot remove the temp file it was writing; its pid tells it is stale
                remove_stale_temp_files(self.output)
            if writers is not None:
                writers.shutdown(wait=True, cancel_futures=True)
            try:
                self._collect(writing, limit=0)
            except BrokenProcessPool:
                pass
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

        return self.finish_run(reused, interrupted)

    def finish_run(self, reused: int, interrupted: bool) -> PredictResult:
        """The summary (and labels.json) from the records; OutputWriteError when the run was stopped
        by its output folder or the summary cannot be written."""
        ordered = [self.records[i] for i in sorted(self.records)]
        total = len(self.sources.sources)
        stopped = None if self.stop is None else f"cannot write to {self.output}: {self.stop.strerror or self.stop}"
        try:
            summary = self.folder.close(ordered, total, reused, interrupted, self.sources.skipped,
                                        self.opt.labels.to_json(), stopped=stopped)
            written = "summary.json written"
        except OSError as exc:
            if stopped is None:
                raise OutputWriteError(f"all inputs processed, but the summary could not be written to {self.output}: "
                                       f"{exc.strerror or exc}; run the same command again to write it") from None
            written = "summary.json not written either"
        if stopped is not None:
            ok = sum(r["status"] == "ok" for r in ordered)
            raise OutputWriteError(f"stopped: {stopped} ({ok} of {total} inputs done, {written}); once the folder "
                                   "can be written again, run the same command to finish")
        failed = sum(1 for r in ordered if r["status"] != "ok")
        return PredictResult(self.output, ordered, summary, failed=failed, reused=reused, interrupted=interrupted)


class PhotoJobs:
    """A run's photos: decoded by the workers (or on the device), then through the model in batches."""

    def jobs(self, run: PredictRun, todo: list[Item], pool: WorkerPool, text: torch.Tensor | None,
             window: int) -> Iterator[tuple[Item, host.FinishJob | None]]:
        """decode (in the pool, at most `window` ahead) -> infer (batches): per input, its job for
        the workers, or None with `item.error` set."""
        decoding: deque[tuple[Item, Future | None]] = deque()
        pending = iter(todo)
        first_step = host.read_for_device if run.device_inputs else host.decode

        def refill() -> None:
            while len(decoding) < window and (item := next(pending, None)) is not None:
                run._prepare(item)
                fut = None if item.error else pool.submit("decoding", first_step, item.source.path)
                decoding.append((item, fut))

        try:
            refill()
            batch: list[Item] = []
            while decoding:
                item, fut = decoding.popleft()
                item = run._decoded(item, fut) if fut is not None else item
                refill()
                if item.error:
                    yield item, None
                else:
                    batch.append(item)
                if len(batch) == run.opt.batch_size or (not decoding and batch):
                    if run.device_inputs:
                        ready = run.device_inputs.decode(batch)
                        yield from ((item, None) for item in batch if item.error)
                        batch = ready
                    if batch:
                        yield from zip(batch, run.step.infer(batch, text))
                    batch = []
        finally:
            for _, fut in decoding:
                if fut is not None:
                    fut.cancel()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
