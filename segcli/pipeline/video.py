"""Videos through predict's model path: frames in batches, outputs that appear only when whole.

    PyAV decode (FFmpeg, threaded) -> every --vid-stride-th frame -> the model's input as for a
    photo (Segmenter.prepare_pixels) -> batches through Segmenter.segment_images -> [--smooth: an exponential
    moving average of the logits] -> the photos' restore_label_map -> per frame: the mask PNG,
    the colors and the overlay as video frames (libx264), the label fractions as a CSV row

Memory is flat in the video's length: one batch of frames at a time. Everything is written into a
hidden temp folder beside the outputs and renamed into place when the video is done, so a killed
run leaves no partial video (the next run removes the temp folder and redoes that video).

Outputs for NAME.mp4 (the photos' layout rules): NAME_masks/ (one PNG label map per processed
frame, named by its index in the source video: 000000.png, 000005.png, ...), NAME_color.mp4,
NAME_overlay.mp4 (the processed frames' size and rate, the overlay with a legend), NAME_labels.csv
(per processed frame: index, time, the fraction of each label).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from segcli.errors import one_line
from segcli.files.atomic import TMP_PREFIX, atomic_write_bytes
from segcli.inputs.sources import Source
from segcli.pipeline.host import HostPlan, InputFailure, make_output_folder, present_labels
from segcli.postprocess.label_map import restore_label_map
from segcli.postprocess.outputs import VIDEO_OUTPUTS
from segcli.postprocess.render import colorize_bgr, encode_png, overlay_bgr


class _Encoder:
    """One output video (H.264, the processed frames' size and rate) written to `path`."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction):
        import av

        self.file = av.open(str(path), "w")
        self.stream = self.file.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        # 4:2:0 (what every player takes) needs even sides; odd frame sizes keep full chroma instead
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        # ultrafast: 5-6 ms per 720p frame on one core (veryfast: 12), files a little larger
        self.stream.options = {"crf": "20", "preset": "ultrafast"}
        self.count = 0

    def write(self, bgr: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
        frame.pts = self.count
        self.count += 1
        for packet in self.stream.encode(frame):
            self.file.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.file.mux(packet)
        self.file.close()
        self.file = None

    def discard(self) -> None:
        """After a failure: let go of the file (the temp folder it is in goes away)."""
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # a half-written container may refuse to finish; it is deleted anyway
                pass
            self.file = None


def _write_mask(path: Path, mask: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(mask))


class VideoRun:
    """Segments one video after another with one model and one run's settings."""

    def __init__(self, seg, plan: HostPlan, text, batch_size: int, vid_stride: int = 1, smooth: float = 0.0,
                 on_frames: Callable[[int], None] | None = None, refiner=None):
        self.seg, self.plan, self.text, self.refiner = seg, plan, text, refiner  # refiner: PAMR, as predict's
        self.groups = seg.label_groups(plan.labels)  # synonyms scored separately, or None
        self.batch_size, self.vid_stride, self.smooth = batch_size, vid_stride, smooth
        self.on_frames = on_frames or (lambda n: None)

    def process(self, source: Source) -> dict:
        """All outputs of one video, renamed into place at the end; returns its record. A bad video
        raises InputFailure (one line); a failing disk raises OSError."""
        import av

        t0 = time.perf_counter()
        outputs = self.plan.outputs(source)
        folder = next(iter(outputs.values())).parent
        make_output_folder(folder, self.plan)
        tmp = folder / f"{TMP_PREFIX}{os.getpid()}@{socket.gethostname()}.{source.rel.name}.d"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            try:
                container = av.open(str(source.path))
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise InputFailure(f"cannot read video: {one_line(str(exc))}") from None
            try:
                stats = self._frames(container, source, tmp)
            except av.FFmpegError as exc:
                raise InputFailure(f"cannot decode video: {one_line(str(exc))}") from None
            finally:
                container.close()
            for kind, path in outputs.items():  # whole: only now do the outputs appear
                made = tmp / VIDEO_OUTPUTS[kind]
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                os.replace(made, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        names = self.plan.labels.names
        fractions, present = present_labels(stats.pop("counts"))
        record = {"input": source.display, "path": str(source.path), "output": str(source.rel), "status": "ok",
                  "kind": "video", **stats, "seconds": round(time.perf_counter() - t0, 4),
                  "labels": {names[k]: round(float(fractions[k]), 6) for k in present},
                  "files": [str(p.relative_to(self.plan.output)) for p in outputs.values()]}
        if "embeddings" in self.plan.kinds:  # said, not skipped silently
            record["warning"] = "no embeddings: --save embeddings applies to photos only"
        return record

    def _frames(self, container, source: Source, tmp: Path) -> dict:
        if not container.streams.video:
            raise InputFailure("not a video (no video stream)")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > self.plan.max_pixels:
            raise InputFailure(f"video frames are {width}x{height}, above the {self.plan.max_pixels / 1e6:.3g} MP "
                               "limit (raise --max-pixels to allow)")
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        out_rate = Fraction(rate) / self.vid_stride
        kinds = self.plan.kinds
        if "mask" in kinds:
            (tmp / VIDEO_OUTPUTS["mask"]).mkdir()
        encoders = {k: _Encoder(tmp / VIDEO_OUTPUTS[k], width, height, out_rate) for k in ("color", "overlay") if k in kinds}
        # a thread per output (in order): x264 and PNG encoding release the GIL, so they overlap with
        # the next batch's decoding and model; at most one batch is in flight (flat memory)
        self._writers = {k: ThreadPoolExecutor(1, thread_name_prefix=f"segcli-video-{k}") for k in ("mask", *encoders)}
        self._pending: list[Future] = []
        try:
            return self._decode_all(container, stream, tmp, encoders, width, height, rate)
        finally:
            for pool in self._writers.values():
                pool.shutdown(wait=True, cancel_futures=True)
            for encoder in encoders.values():
                encoder.discard()

    def _decode_all(self, container, stream, tmp: Path, encoders: dict, width: int, height: int, rate) -> dict:
        names = self.plan.labels.names
        rows = io.StringIO()
        table = csv.writer(rows, lineterminator="\n")
        table.writerow(["frame", "time_s", *names])
        state = {"read": 0, "processed": 0, "counts": np.zeros(len(names), np.int64), "previous": None, "last_time": 0.0}
        batch: list[tuple[int, float, object]] = []
        for frame in container.decode(stream):
            index = state["read"]
            state["read"] += 1
            if frame.width != width or frame.height != height:
                raise InputFailure(f"frame {index} is {frame.width}x{frame.height}, not {width}x{height} like the first")
            state["last_time"] = float(frame.time) if frame.time is not None else index / float(rate)
            if index % self.vid_stride:
                continue
            batch.append((index, state["last_time"], frame.to_image()))
            if len(batch) == self.batch_size:
                self._batch(batch, tmp, encoders, table, state)
                batch = []
        if batch:
            self._batch(batch, tmp, encoders, table, state)
        self._settle()
        if state["processed"] == 0:
            raise InputFailure("the video has no frames that can be decoded")
        declared = stream.frames
        if declared and state["read"] < declared:
            raise InputFailure(f"truncated: {state['read']} of {declared} frames could be decoded")
        if not declared and container.duration and state["last_time"] < container.duration / 1e6 - 2 / float(rate) - 0.5:
            raise InputFailure(f"truncated: frames end at {state['last_time']:.1f} s of {container.duration / 1e6:.1f} s")
        for encoder in encoders.values():
            encoder.close()
        atomic_write_bytes(tmp / VIDEO_OUTPUTS["labels"], rows.getvalue().encode())
        return {"width": width, "height": height, "frames_read": state["read"], "frames_processed": state["processed"],
                "fps": round(float(rate), 4), "duration_s": round(state["last_time"] + 1 / float(rate), 4),
                "vid_stride": self.vid_stride, "counts": state["counts"]}

    def _settle(self) -> None:
        """Wait for the outputs in flight (their errors surface here)."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def _batch(self, batch, tmp: Path, encoders: dict, table, state: dict) -> None:
        import torch

        self._settle()
        def smoothed(i: int, frame_logits: torch.Tensor) -> torch.Tensor:
            """Flicker: each frame's logits blended with the running average before it."""
            if state["previous"] is not None:
                frame_logits = torch.lerp(frame_logits, state["previous"], self.smooth)
            state["previous"] = frame_logits
            return frame_logits

        prepared = [self.seg.runner.prepare_pixels(image) for _, _, image in batch]  # the photos' protocol
        finished, _ = self.seg.runner.segment_finished(*zip(*prepared), self.text, len(batch), self.refiner, self.groups,
                                                between=smoothed if self.smooth else None)
        plan, k = self.plan, len(self.plan.labels)
        for (index, seconds, image), (frame_logits, valid) in zip(batch, finished):
            counts = np.zeros(k, np.int64)
            mask = restore_label_map(frame_logits, valid, (image.height, image.width), histogram=counts, groups=self.groups)
            state["counts"] += counts
            fractions, present = present_labels(counts)
            if "mask" in plan.kinds:
                self._pending.append(self._writers["mask"].submit(_write_mask, tmp / VIDEO_OUTPUTS["mask"] / f"{index:06d}.png", mask))
            if encoders:
                color = colorize_bgr(mask, plan.palette, plan.lut)
                if "color" in encoders:
                    self._pending.append(self._writers["color"].submit(encoders["color"].write, color))
                if "overlay" in encoders:
                    legend = [(plan.labels.names[i], plan.labels.colors[i]) for i in sorted(present)]
                    photo = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
                    self._pending.append(self._writers["overlay"].submit(
                        lambda photo=photo, color=color, legend=legend: encoders["overlay"].write(
                            overlay_bgr(photo, color, plan.alpha, legend, in_place=True))))
            table.writerow([index, f"{seconds:.4f}", *(f"{fractions[i]:.6f}" for i in range(k))])
            state["processed"] += 1
        self.on_frames(len(batch))
