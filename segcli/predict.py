"""The predict engine: a stream from SOURCE files to masks, colors, overlays and summaries.

decode (thread pool, bounded window) -> model (main thread, batches) -> restore + render + write
(thread pool, bounded). Memory depends on the batch size and window, never on the number of inputs.
Outputs are written atomically; DIR/.segcli/ remembers what produced them so a re-run only does
what is missing and refuses to mix results of different settings.
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from segcli import __version__
from segcli.api import Segmenter
from segcli.data.images import DEFAULT_MAX_PIXELS, Canvas, ImageDecodeError, decode_image
from segcli.data.sources import Source, SourceList
from segcli.errors import SegcliError
from segcli.fileio import atomic_write_bytes, atomic_write_json, remove_stale_temp_files
from segcli.labels import LabelSet
from segcli.masks import label_fractions
from segcli.render import colorize, encode_jpeg, encode_png, overlay, palette_array

OUTPUT_KINDS = ("mask", "color", "overlay")
SUFFIXES = {"mask": "_mask.png", "color": "_color.png", "overlay": "_overlay.jpg"}
STATE_DIR = ".segcli"


@dataclass
class PredictOptions:
    labels: LabelSet
    prompt: str | None = None
    output: Path | None = None  # None: a new runs/predict/N
    save: tuple[str, ...] = OUTPUT_KINDS
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
class _Decoded:
    source: Source
    canvas: Canvas | None = None
    full_hw: tuple[int, int] = (0, 0)
    photo: np.ndarray | None = None
    seconds: float = 0.0
    error: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)


def next_run_dir(base: Path = Path("runs/predict")) -> Path:
    """A new numbered folder runs/predict/N (N = 1, 2, ...), created now so parallel runs differ."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SegcliError(f"cannot create output folder {base}: {exc.strerror}") from None
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    n = max(taken, default=0) + 1
    while True:
        try:
            (base / str(n)).mkdir()
            return base / str(n)
        except FileExistsError:
            n += 1


def _prepare_output(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # can we write here? (removed on close)
            pass
    except OSError as exc:
        raise SegcliError(f"output folder {path} cannot be created or written: {exc.strerror or exc}") from None
    return path


class PredictRun:
    """One `segcli predict` run over a list of sources."""

    def __init__(self, segmenter: Segmenter, options: PredictOptions, sources: SourceList,
                 on_record: Callable[[dict], None] | None = None):
        self.seg = segmenter
        self.opt = options
        self.sources = sources
        self.on_record = on_record or (lambda record: None)
        self.palette = palette_array(options.labels)
        self.output = _prepare_output(options.output or next_run_dir())
        self.output_real = self.output.resolve()
        self.state = self.output / STATE_DIR
        tag = f".shard-{options.shard[0]}-of-{options.shard[1]}" if options.shard else ""
        self.records_file = self.state / f"records{tag}.jsonl"
        self.summary_file = self.output / f"summary{tag}.json"
        self.settings = {
            "model": segmenter.name,
            "model_fingerprint": segmenter.fingerprint,
            "labels": options.labels.to_json(),
            "prompt": options.prompt,
            "imgsz": segmenter.imgsz,
            "precision": str(segmenter.autocast_dtype or torch.float32).replace("torch.", ""),
            "save": list(options.save),
            "alpha": options.alpha,
        }
        self._stop = threading.Event()

    # -- state of DIR -------------------------------------------------------------------------

    def _check_settings(self) -> dict[str, dict]:
        """Previous records that can be reused, after making sure DIR was produced the same way."""
        self.state.mkdir(exist_ok=True)
        run_file, records_file = self.state / "run.json", self.records_file
        previous = None
        if run_file.exists():
            try:
                previous = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = None
        if previous is not None and not self.opt.overwrite:
            changed = [k for k in self.settings if previous.get(k) != self.settings[k]]
            if changed:
                raise SegcliError(
                    f"{self.output} holds results made with other settings ({', '.join(changed)} differ): "
                    "use --overwrite to replace them, or another --output")
        if self.opt.overwrite or previous is None:
            records_file.unlink(missing_ok=True)
        atomic_write_json(run_file, self.settings)
        done: dict[str, dict] = {}
        # every shard's records count: a re-run with another shard split still reuses finished work
        for path in sorted(self.state.glob("records*.jsonl")) if not self.opt.overwrite else [records_file]:
            if not path.exists():
                continue
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a killed run
                if record.get("status") == "ok":
                    done[record["output"]] = record
        return done

    def _outputs(self, source: Source) -> dict[str, Path]:
        base = self.output / Path(*source.rel.parent.parts)
        return {kind: base / (source.rel.name + SUFFIXES[kind]) for kind in self.opt.save}

    def _is_done(self, source: Source, done: dict[str, dict]) -> dict | None:
        record = done.get(str(source.rel))
        if record and record.get("path") == str(source.path) and all(p.is_file() for p in self._outputs(source).values()):
            return record
        return None

    # -- the three stages ---------------------------------------------------------------------

    def _decode(self, source: Source) -> _Decoded:
        t0 = time.perf_counter()
        item = _Decoded(source=source)
        if source.error:
            item.error = source.error
            return item
        try:
            need_photo = "overlay" in self.opt.save
            img, item.full_hw = decode_image(source.path, self.opt.max_pixels,
                                             draft_long_side=None if need_photo else self.seg.imgsz)
            item.canvas = self.seg.prepare(img)
            item.photo = np.asarray(img) if need_photo else None
        except ImageDecodeError as exc:
            item.error = str(exc)
        except MemoryError:
            item.error = "out of memory while decoding"
        except Exception as exc:  # a decoder bug on a strange file must not stop the batch
            item.error = f"cannot decode image: {type(exc).__name__}: {str(exc)[:200]}"
        item.seconds = time.perf_counter() - t0
        return item

    def _write(self, item: _Decoded) -> dict:
        t0 = time.perf_counter()
        src = item.source
        mask = self.seg.label_map(item.logits, item.canvas, item.full_hw)
        item.logits = None
        paths = self._outputs(src)
        folder = next(iter(paths.values())).parent
        folder.mkdir(parents=True, exist_ok=True)
        real = folder.resolve()
        if real != self.output_real and self.output_real not in real.parents:
            raise _InputFailure(f"output folder {folder} leads outside {self.output} (symlink); not written")
        fractions = label_fractions(mask, len(self.opt.labels))
        present = [k for k in np.argsort(-fractions, kind="stable") if fractions[k] > 0]  # most pixels first
        if "mask" in paths:
            atomic_write_bytes(paths["mask"], encode_png(mask))
        if "color" in paths or "overlay" in paths:
            color = colorize(mask, self.palette)
            if "color" in paths:
                atomic_write_bytes(paths["color"], encode_png(color))
            if "overlay" in paths:
                photo = item.photo  # full size: decode skips draft mode when overlays are wanted
                legend = [(self.opt.labels.names[k], self.opt.labels.colors[k]) for k in present]
                atomic_write_bytes(paths["overlay"], encode_jpeg(overlay(photo, color, self.opt.alpha, legend)))
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

    def _error_record(self, source: Source, message: str) -> dict:
        return {"input": source.display, "path": str(source.path), "output": str(source.rel),
                "status": "error", "error": message}

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> PredictResult:
        remove_stale_temp_files(self.output)
        done = self._check_settings()
        text = self.seg.label_embeddings(self.opt.labels, self.opt.prompt)  # once per run
        records: dict[int, dict] = {}
        todo: list[tuple[int, Source]] = []
        reused = 0
        for index, source in enumerate(self.sources.sources):
            previous = self._is_done(source, done)
            if previous is not None:
                records[index] = previous
                reused += 1
                self.on_record(previous)
            else:
                todo.append((index, source))

        records_file = open(self.records_file, "a", encoding="utf-8")
        workers = max(1, self.opt.workers)
        window = self.opt.batch_size * 2 + workers
        decode_pool = ThreadPoolExecutor(workers, thread_name_prefix="segcli-decode")
        write_pool = ThreadPoolExecutor(workers, thread_name_prefix="segcli-write")
        decoding: deque[tuple[int, Future]] = deque()
        writing: deque[tuple[int, Source, Future]] = deque()
        pending = iter(todo)
        interrupted = False

        def finish(index: int, record: dict) -> None:
            records[index] = record
            records_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            records_file.flush()
            self.on_record(record)

        def refill() -> None:
            while len(decoding) < window:
                nxt = next(pending, None)
                if nxt is None:
                    return
                decoding.append((nxt[0], decode_pool.submit(self._decode, nxt[1])))

        def collect_writes(limit: int) -> None:
            """Record finished writes (all that are done, and more until at most `limit` are pending)."""
            while writing and (len(writing) > limit or writing[0][2].done()):
                index, source, fut = writing.popleft()
                if fut.cancelled():  # interrupted before it started: not done, the next run does it
                    continue
                try:
                    finish(index, fut.result())
                except _InputFailure as exc:
                    finish(index, self._error_record(source, str(exc)))
                except OSError as exc:
                    finish(index, self._error_record(source, f"cannot write outputs: {exc.strerror or exc}"))
                except (MemoryError, ValueError, RuntimeError) as exc:
                    finish(index, self._error_record(source, f"failed: {type(exc).__name__}: {str(exc)[:200]}"))

        def run_batch(batch: list[tuple[int, _Decoded]]) -> None:
            t0 = time.perf_counter()
            logits, _ = self.seg.segment_canvases(np.stack([it.canvas.pixels for _, it in batch]), text)
            share = (time.perf_counter() - t0) / len(batch)
            for i, (index, item) in enumerate(batch):
                item.logits, item.canvas.pixels = logits[i], None
                item.seconds += share
                writing.append((index, item.source, write_pool.submit(self._write, item)))
            collect_writes(limit=window)

        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            refill()
            batch: list[tuple[int, _Decoded]] = []
            while decoding:
                index, fut = decoding.popleft()
                refill()
                item = fut.result()
                collect_writes(limit=window)
                if item.error:
                    finish(index, self._error_record(item.source, item.error))
                else:
                    batch.append((index, item))
                if len(batch) == self.opt.batch_size or (not decoding and batch):
                    run_batch(batch)
                    batch = []
            collect_writes(limit=0)
        except KeyboardInterrupt:
            interrupted = True
            for _, fut in decoding:
                fut.cancel()
        finally:
            decode_pool.shutdown(wait=True, cancel_futures=True)
            write_pool.shutdown(wait=True, cancel_futures=True)  # running writes finish: files stay whole
            collect_writes(limit=0)
            records_file.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

        ordered = [records[i] for i in sorted(records)]
        summary = self._summary(ordered, reused, interrupted)
        atomic_write_json(self.output / "labels.json", self.opt.labels.to_json())
        atomic_write_json(self.summary_file, summary)
        failed = sum(1 for r in ordered if r["status"] != "ok")
        return PredictResult(self.output, ordered, summary, failed=failed, reused=reused, interrupted=interrupted)

    def _summary(self, records: list[dict], reused: int, interrupted: bool) -> dict:
        ok = sum(1 for r in records if r["status"] == "ok")
        return {
            "segcli_version": __version__,
            "model": self.settings["model"],
            "labels": list(self.opt.labels.names),
            "settings": {k: v for k, v in self.settings.items() if k not in ("labels", "model")},
            "counts": {"inputs": len(self.sources.sources), "ok": ok, "failed": len(records) - ok,
                       "reused": reused, "not_done": len(self.sources.sources) - len(records)},
            "interrupted": interrupted,
            "shard": list(self.opt.shard) if self.opt.shard else None,
            "skipped_non_images": self.sources.skipped,
            "images": records,
        }


def merge_summaries(folder: Path) -> dict:
    """Fold DIR/summary.shard-I-of-N.json (all N present, same settings) into DIR/summary.json."""
    parts = sorted(folder.glob("summary.shard-*-of-*.json"))
    if not parts:
        raise SegcliError(f"{folder} has no summary.shard-I-of-N.json files to merge")
    summaries = []
    for path in parts:
        try:
            summaries.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise SegcliError(f"{path} is unreadable: {exc}") from None
    counts = {s["shard"][1] for s in summaries}
    if len(counts) != 1:
        raise SegcliError(f"{folder} mixes shard splits (N = {sorted(counts)}): merge one split at a time")
    total = counts.pop()
    missing = sorted(set(range(total)) - {s["shard"][0] for s in summaries})
    if missing:
        raise SegcliError(f"{folder}: shard(s) {', '.join(map(str, missing))} of {total} have not finished (no summary yet)")
    first = summaries[0]
    for s in summaries[1:]:
        if (s["model"], s["labels"], s["settings"]) != (first["model"], first["labels"], first["settings"]):
            raise SegcliError(f"{folder}: shards were run with different settings; not merged")
    images = sorted((r for s in summaries for r in s["images"]), key=lambda r: r["output"])
    merged = dict(first)
    merged.update({
        "counts": {k: sum(s["counts"][k] for s in summaries) for k in first["counts"]},
        "interrupted": any(s["interrupted"] for s in summaries),
        "shard": None,
        "merged_from": [p.name for p in parts],
        "skipped_non_images": sorted({x for s in summaries for x in s["skipped_non_images"]}),
        "images": images,
    })
    atomic_write_json(folder / "summary.json", merged)
    return merged


class _InputFailure(Exception):
    """An input whose outputs could not be produced; recorded, the run goes on."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
