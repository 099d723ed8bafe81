"""The `segcli` command: a thin Typer layer over the Python API.

Exit status: 0 all inputs done; 1 some inputs failed (named on stderr and in summary.json);
2 usage or environment error (bad labels, missing/corrupt model, unknown device, unwritable
output); 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console

from segcli import __version__
from segcli.errors import SegcliError
from segcli.registry import DEFAULT_MODEL

if TYPE_CHECKING:  # the CLI imports torch only inside the commands that need it
    from segcli.api import Segmenter

EXIT_CODES = """Exit status: 0 all inputs done; 1 some inputs failed (see stderr and summary.json);
2 usage or environment error; 130 interrupted."""

# options that predict, relabel and eval share: one wording each
SYNONYMS_HELP = ('How a label\'s synonyms ("road;street") are scored: max (each on its own, the label keeps its best: '
                 "the training-free methods' rule, clip-dense's default) or mean (one averaged embedding: LSeg's default).")
BG_THRESHOLD_HELP = ("Pixels whose best label has a probability below this (softmax over the labels, as the training-free "
                     "methods' prob_thd, e.g. 0.1) take the first label: put the background class first.")
SHORT_SIDE_HELP = ("With windows: resize photos so the short side is N (long side at most 2048), as the training-free "
                   "methods' authors do. Default: the model's (clip-dense: 448 clearclip, 336 naclip).")
WINDOW_HELP = ("Slide windows of N pixels over the resized photo and average their logits (0: one padded canvas of "
               "--imgsz). Default: the model's (clip-dense: 448 clearclip, 224 naclip; LSeg: 0).")
STRIDE_HELP = "Window step in pixels. Default: the model's, else half the window."


def _read_images_as(seg: Segmenter, short_side: int | None, window: int | None, stride: int | None,
                    synonyms: str | None, bg_threshold: float | None) -> None:
    """predict's and eval's protocol, synonym and background options onto the Segmenter (one-line errors)."""
    seg.use_protocol(short_side, window, stride)
    seg.use_synonyms(synonyms)
    seg.use_bg_threshold(bg_threshold)


app = typer.Typer(
    name="segcli",
    help="Batch open-vocabulary semantic segmentation (LSeg-style): any labels, any folder of photos.\n\n"
    + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True) if err.is_terminal else print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def user_errors(fn):
    """Turn SegcliError into one line on stderr and exit status 2: no traceback for user mistakes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegcliError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except OSError as exc:  # the environment (a full disk, permissions), not a bug: one line as well
            where = f": {exc.filename}" if exc.filename else ""
            raise _fail(f"{exc.strerror or exc}{where}", 2) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None

    return wrapper


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _version_callback(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
@user_errors
def predict(
    sources: Optional[List[str]] = typer.Argument(None, help="Image and video files, folders (recursive), globs, .txt lists of paths, or - (paths on stdin)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help='Labels: "road,car,sky", synonyms "road;street", @file.txt, or a named set (ade20k). Default: the labels the checkpoint was trained on.'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="clip-dense[:ARCH[@TAG]] (training-free CLIP, the default: clip-dense:ViT-B-16), a segcli checkpoint (.safetensors), an LSeg .ckpt, an open_clip weights file, or an architecture name (untrained, for smoke tests)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder. Default: a new runs/predict/N."),
    save: str = typer.Option("mask,color,overlay", "--save", help="Which outputs to write: any of mask,color,overlay,embeddings (NAME_embed.safetensors: the pixel embeddings, for segcli relabel and search)."),
    embed_dtype: str = typer.Option("auto", "--embed-dtype", help="Stored embeddings' dtype: auto (the 16-bit dtype the model computed in, else float16), float16, bfloat16, float32."),
    refine: str = typer.Option("auto", "--refine", help="Refine the logits with the photo's colours: pamr (PAMR, as NACLIP), none, or auto (pamr for naclip models)."),
    vid_stride: int = typer.Option(1, "--vid-stride", min=1, help="Videos: process every N-th frame (mask PNGs keep the source frame index)."),
    smooth: float = typer.Option(0.0, "--smooth", min=0.0, max=0.99, help="Videos: blend each frame's logits with the running average of the frames before (0 = off; 0.5 halves flicker)."),
    embed_stride: Optional[int] = typer.Option(None, "--embed-stride", min=1, help="Store embeddings average-pooled to this stride in input pixels (a multiple of the model's output stride; default: that stride)."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colors."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help='Prompt template, e.g. "a photo of a {}.", or a named set averaged over its templates: imagenet80 (CLIP\'s 80, as ClearCLIP/SCLIP/NACLIP). Default: the raw label for LSeg models, "a photo of a {}." for clip-dense.'),
    synonyms: Optional[str] = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    bg_threshold: Optional[float] = typer.Option(None, "--bg-threshold", help=BG_THRESHOLD_HELP),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="One canvas's long side (a multiple of 32 for LSeg, of the patch size for clip-dense; clip-dense uses it with --window 0). Default: the model's (LSeg 384, clip-dense 448)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images (or windows) per forward pass."),
    short_side: Optional[int] = typer.Option(None, "--short-side", help=SHORT_SIDE_HELP),
    window: Optional[int] = typer.Option(None, "--window", help=WINDOW_HELP),
    stride: Optional[int] = typer.Option(None, "--stride", help=STRIDE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Worker processes for decoding, label maps, rendering and writing (each uses one core). Default: 2 with the model on the CPU, all cores but one (at most 16) on a GPU."),
    postprocess: str = typer.Option("host", "--postprocess", help="Where the full-size work (label map, colors, overlay) runs: host (the worker processes; auto means the same), device (torch on the model's device)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 on CUDA, bf16 on CPUs with native bf16), fp32, bf16, fp16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image, replacing results made with other settings."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Refuse larger images (decompression bombs)."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON line per image on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors are still reported)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: take a deterministic 1/N of the sorted inputs (shards 0..N-1 into one --output, then --merge-summaries). Under torchrun: the rank."),
    merge_summaries: Optional[Path] = typer.Option(None, "--merge-summaries", help="Fold DIR/summary.shard-*.json of finished shards into DIR/summary.json and exit."),
) -> None:
    """Segment photos: writes NAME_mask.png, NAME_color.png, NAME_overlay.jpg, labels.json, summary.json."""
    from segcli.api import Segmenter
    from segcli.data.sources import collect_sources, parse_shard, take_shard
    from segcli.distributed import merge_predict_shards, rank_device, torchrun_ranks
    from segcli.labels import parse_labels
    from segcli.models import UNTRAINED_WARNING
    from segcli.outputs import parse_outputs
    from segcli.predict import PredictOptions, PredictRun
    from segcli.runfolder import merge_summaries as merge

    if merge_summaries is not None:
        merged = merge(merge_summaries)
        print(f"merged {len(merged['merged_from'])} shard summaries: {merged['counts']['ok']} ok, "
              f"{merged['counts']['failed']} failed -> {merge_summaries / 'summary.json'}", file=sys.stderr)
        return
    if not sources:
        raise SegcliError("no SOURCE given: pass image files, folders, globs, lists or - (see 'segcli predict --help')")
    ranks = torchrun_ranks()
    shard_spec = parse_shard(shard) if shard else ranks
    if ranks and output is None:
        raise SegcliError("under torchrun, give --output: every rank writes its shard into that folder")
    kinds = parse_outputs(save)
    label_set = parse_labels(labels) if labels is not None else None
    stdin_lines = sys.stdin.read().splitlines() if "-" in sources else None
    found = collect_sources(sources, stdin_lines=stdin_lines, exclude=output)
    if not found.sources:
        raise SegcliError(f"no images or videos found in {' '.join(sources)}"
                          + (f" ({len(found.skipped)} non-image files skipped)" if found.skipped else ""))
    if shard_spec:
        found = take_shard(found, *shard_spec)
    model = model or DEFAULT_MODEL
    seg = Segmenter.from_pretrained(model, device=str(rank_device(device)), precision=precision, imgsz=imgsz, warn=False)
    _read_images_as(seg, short_side, window, stride, synonyms, bg_threshold)
    if seg.untrained:
        _warn(UNTRAINED_WARNING.format(name=model))
    label_set = seg.resolve_labels(label_set)
    options = PredictOptions(labels=label_set, prompt=prompt, output=output, save=kinds, alpha=alpha,
                             batch_size=batch_size, workers=workers, overwrite=overwrite, max_pixels=max_pixels,
                             shard=shard_spec, postprocess=postprocess, embed_dtype=embed_dtype, embed_stride=embed_stride,
                             vid_stride=vid_stride, smooth=smooth, refine=refine)
    reporter = _Reporter(total=len(found.sources), quiet=quiet, json_lines=json_lines)
    run = PredictRun(seg, options, found, on_record=reporter.record, on_frames=reporter.frames)
    with reporter:
        result = run.run()
    if ranks:
        merge_predict_shards(result.output)
    if result.interrupted:
        raise _fail(f"interrupted: {len(result.records)} of {len(found.sources)} done; run again to finish", 130)
    if not quiet:
        ok = len(result.records) - result.failed
        skipped = f", {len(found.skipped)} non-image file(s) skipped (see summary.json)" if found.skipped else ""
        print(f"done: {ok} ok, {result.failed} failed, {result.reused} already done{skipped} -> {result.output}",
              file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def relabel(
    folder: Path = typer.Argument(..., help="A predict run's DIR that holds stored embeddings (--save embeddings)."),
    labels: str = typer.Option(..., "--labels", "-l", help='The new labels: "road,car,sky", synonyms "road;street", @file.txt, or a named set.'),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder. Default: a new runs/relabel/N."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model that made the embeddings, when it moved (default: the one DIR records)."),
    save: str = typer.Option("mask,color,overlay", "--save", help="Which outputs to write: any of mask,color,overlay (overlays need the original photos)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template for the labels (as predict's)."),
    synonyms: Optional[str] = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colors."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Worker processes for label maps, rendering and writing."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every photo, replacing results made with other settings."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON line per photo on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors are still reported)."),
) -> None:
    """Predict's outputs for new labels from stored embeddings, without running the image encoder."""
    from segcli.api import Segmenter
    from segcli.labels import parse_labels
    from segcli.outputs import parse_outputs
    from segcli.predict import PredictOptions
    from segcli.relabel import RelabelRun, recorded_model, stored_embeddings
    from segcli.runfolder import next_run_dir

    label_set = parse_labels(labels)
    kinds = parse_outputs(save)
    stored = stored_embeddings(folder)
    sizes = {e.info.imgsz for e in stored}
    if len(sizes) > 1:
        raise SegcliError(f"{folder} mixes embeddings made at several --imgsz ({sorted(sizes)}): relabel one at a time")
    seg = Segmenter.from_pretrained(model or recorded_model(folder), device=device, imgsz=sizes.pop(), warn=False)
    seg.use_protocol(window=0)  # the stored cells are one canvas's
    seg.use_synonyms(synonyms)
    options = PredictOptions(labels=label_set, prompt=prompt, output=output or next_run_dir(Path("runs/relabel")),
                             save=kinds, alpha=alpha, workers=workers, overwrite=overwrite)
    reporter = _Reporter(total=len(stored), quiet=quiet, json_lines=json_lines)
    run = RelabelRun(seg, options, stored, folder, on_record=reporter.record)
    with reporter:
        result = run.run()
    if result.interrupted:
        raise _fail(f"interrupted: {len(result.records)} of {len(stored)} done; run again to finish", 130)
    if not quiet:
        ok = len(result.records) - result.failed
        print(f"done: {ok} ok, {result.failed} failed, {result.reused} already done -> {result.output}", file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def search(
    folder: Path = typer.Argument(..., help="A predict run's DIR that holds stored embeddings (--save embeddings)."),
    query: List[str] = typer.Option(..., "--query", "-q", help='What to look for, e.g. "red car" (repeat for several).'),
    against: Optional[str] = typer.Option(None, "--against", help="The labels a query must beat at a pixel (default: the labels the run was made with)."),
    top: Optional[int] = typer.Option(None, "--top", "-n", min=1, help="Only the N best photos per query."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model that made the embeddings, when it moved."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template for the queries and labels."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line: query, score, cells, path, embeddings."),
) -> None:
    """Rank stored photos by the fraction of their pixels where a query wins: SCORE<TAB>PATH, best first."""
    from segcli.api import Segmenter
    from segcli.labels import LabelSet, parse_labels
    from segcli.relabel import recorded_model
    from segcli.search import search as run_search

    queries = [q.strip() for q in query if q.strip()]
    if not queries:
        raise SegcliError("--query is empty: say what to look for")
    if against is not None:
        rivals = parse_labels(against)
    else:
        try:
            rivals = LabelSet.from_json(json.loads((folder / "labels.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as exc:
            raise SegcliError(f"{folder}/labels.json is missing or unreadable ({exc}): give --against") from None
    seg = Segmenter.from_pretrained(model or recorded_model(folder), device=device, warn=False)
    hits = run_search(folder, queries, rivals, seg, prompt, top)
    for q in queries:
        for hit in hits[q]:
            if json_out:
                print(json.dumps({"query": hit.query, "score": round(hit.score, 6), "cells": hit.cells, "path": hit.path,
                                  "embeddings": hit.embeddings}, ensure_ascii=False))
            else:
                print(f"{hit.score:.4f}\t" + (f"{hit.query}\t" if len(queries) > 1 else "") + hit.path)


@app.command()
@user_errors
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Any --model value (default: clip-dense:ViT-B-16)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Default labels for requests that send none (default: the model's own)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface: give --api-key then)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Requests per forward pass at most."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0.0, help="How long a request waits for others to share its batch."),
    queue_size: int = typer.Option(64, "--queue", min=1, help="Requests that may wait for the model; more get 503 with Retry-After."),
    max_upload_mb: float = typer.Option(25.0, "--max-upload-mb", min=0.001, help="Larger uploads get 413."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Larger images get 413 (decompression bombs)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SEGCLI_API_KEY", help="Require this key (X-API-Key header or Bearer token) on /v1 routes."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colors."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Model input size (as predict's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16, fp16 (as predict's)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug."),
) -> None:
    """Serve the model over HTTP: POST /v1/segment, GET /v1/info, /healthz, a browser page at /, docs at /docs."""
    try:
        from segcli.serve import ServeOptions, check_listen
        from segcli.serve import serve as run_server
    except ImportError as exc:
        raise SegcliError(f"segcli serve needs the serve extra: pip install 'segcli[serve]' ({exc.name} is missing)") from None
    from segcli.api import Segmenter
    from segcli.labels import parse_labels
    from segcli.models import UNTRAINED_WARNING

    label_set = parse_labels(labels) if labels is not None else None
    seg = Segmenter.from_pretrained(model or DEFAULT_MODEL, device=device, precision=precision, imgsz=imgsz, warn=False)
    if seg.untrained:
        _warn(UNTRAINED_WARNING.format(name=model))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        _warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    options = ServeOptions(labels=label_set, batch_size=batch_size, batch_window_ms=batch_window_ms,
                           queue_size=queue_size, max_upload_mb=max_upload_mb, max_pixels=max_pixels, alpha=alpha,
                           api_key=api_key)
    check_listen(host, port)
    print(f"segcli serve: {seg.name} on http://{host}:{port}/ (API docs at /docs)", file=sys.stderr)
    run_server(seg, options, host, port, log_level)


class _Reporter:
    """Progress on stderr (a rich bar on a terminal, plain lines otherwise); JSON lines on stdout."""

    def __init__(self, total: int, quiet: bool, json_lines: bool):
        self.total, self.quiet, self.json_lines = total, quiet, json_lines
        self.count = 0
        self.progress = None
        if not quiet and err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=False)
            self.task = self.progress.add_task("predict", total=total, rate="")
        self._start = None
        self.frames_done, self._frames_task, self._frames_start = 0, None, None

    def frames(self, count: int) -> None:
        """Video frames processed (a second bar, in frames/s, once a video starts)."""
        now = time.perf_counter()
        if self._frames_start is None:
            self._frames_start = now
            if self.progress:
                self._frames_task = self.progress.add_task("frames", total=None, rate="")
        self.frames_done += count
        rate = self.frames_done / max(1e-9, now - self._frames_start)
        if self._frames_task is not None:
            self.progress.update(self._frames_task, advance=count, rate=f"{rate:.1f} frames/s")
        elif not self.quiet and self.frames_done % 100 < count:
            print(f"  {self.frames_done} video frames ({rate:.1f} frames/s)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._start = time.perf_counter()
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def record(self, rec: dict) -> None:
        self.count += 1
        if self.json_lines:
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        notes = [f"error: {rec['input']}: {rec['error']}"] if rec["status"] != "ok" else []
        if rec.get("warning"):
            notes.append(f"warning: {rec['input']}: {rec['warning']}")
        for line in notes:
            if self.progress:
                self.progress.console.print(line, markup=False)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.progress:
            elapsed = max(1e-9, time.perf_counter() - self._start)
            self.progress.update(self.task, advance=1, rate=f"{self.count / elapsed:.1f} img/s")
        elif not self.quiet and rec["status"] == "ok":
            frames = f", {rec['frames_processed']} frames" if rec.get("kind") == "video" else ""
            print(f"[{self.count}/{self.total}] {rec['input']} ({rec.get('seconds', 0):.2f}s{frames})", file=sys.stderr, flush=True)


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help="Any --model value: a checkpoint, an LSeg .ckpt, open_clip weights, an .onnx export, clip-dense[:ARCH[@TAG]] or an architecture."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what a model is: kind, family, architecture, parameters, labels, metadata (never downloads)."""
    from segcli.models import describe_model

    data = describe_model(model)
    if json_out:
        _show(data, True)
        return
    rows = {k: v for k, v in data.items() if k not in ("config", "metadata") and v is not None}
    if isinstance(rows.get("parameters"), int):
        rows["parameters"] = f"{rows['parameters']:,}"
    if isinstance(rows.get("labels"), list):
        names = rows["labels"]
        rows["labels"] = f"{len(names)}: " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    elif "labels" in data and data["labels"] is None:
        rows["labels"] = "none"
    config = data.get("config") or {}
    if "text" in config:
        rows["text encoder"] = f"CLIP text width {config['text']['width']}, {config['text']['layers']} layers, C = {config['text']['embed_dim']}"
    _show({**rows, **(data.get("metadata") or {})}, False)


def _show(data: dict, json_out: bool) -> None:
    if json_out:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        Console(highlight=False).print(_table(data))


def _table(rows: dict):
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in rows.items():
        table.add_row(str(key), value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return table


@app.command()
@user_errors
def convert(
    source: Path = typer.Argument(..., help="An official LSeg checkpoint (.ckpt from PyTorch Lightning, or a bare state dict), or open_clip CLIP weights."),
    output: Path = typer.Argument(..., help="The segcli checkpoint to write (.safetensors)."),
) -> None:
    """Convert foreign weights (LSeg .ckpt, open_clip CLIP) to a segcli checkpoint, without running code from them."""
    from segcli.convert import convert_weights

    out, model, labels = convert_weights(source, output)
    print(f"converted {source} -> {out} (family {model.family}, architecture {model.architecture}, "
          f"labels {labels.source if labels else 'none'})", file=sys.stderr)


def train(resume: Optional[Path] = None, quiet: bool = False, **options) -> None:
    """Train LSeg: image encoder + DPT decoder against ground-truth masks; CLIP text stays frozen."""
    from segcli.options import TrainOptions
    from segcli.train import resume_training, start_training

    reporter = _TrainReporter(quiet)
    if resume is not None:
        trainer = resume_training(resume, on_event=reporter.event, time_limit=options.get("time_limit"))
    else:
        opts = TrainOptions(**options)
        trainer = start_training(opts, on_event=reporter.event)
    if trainer.dist.main:
        reporter.start(trainer)
    with reporter:
        result = trainer.run()
    if result.stopped_by == "interrupted":
        raise _fail(f"interrupted at step {result.steps}; the state is saved: segcli train --resume {result.output}", 130)
    if trainer.dist.main and not quiet:
        best = result.best or {}
        print(f"done ({result.stopped_by}): {result.steps} steps, best val mIoU {best.get('mIoU', 0):.4f} "
              f"at step {best.get('step')} -> {result.output}", file=sys.stderr)


def _options_signature(cls, extra: list[inspect.Parameter]) -> tuple[inspect.Signature, dict]:
    """A Typer signature with one option per field of the dataclass `cls` (flags, help and min from
    each field's metadata), so the CLI and the options class never drift apart."""
    params, annotations = [], {p.name: p.annotation for p in extra}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kind = hints[f.name]
        option = typer.Option(f.default, *meta["flags"], help=meta["help"], min=meta.get("min"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[f.name] = kind
    return inspect.Signature(params + list(extra)), annotations


def _register_train() -> None:
    from segcli.options import TrainOptions

    extra = [
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--resume", help="Continue the killed or finished run in this folder (its own settings; --time-limit may change).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="No progress output.")),
    ]
    train.__signature__, train.__annotations__ = _options_signature(TrainOptions, extra)
    app.command()(user_errors(train))


_register_train()


class _TrainReporter:
    """A rich bar on a terminal, plain lines otherwise; only on rank 0 (the one `start` is called on)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.main = False

    def start(self, trainer) -> None:
        self.main = True
        if self.quiet or not err.is_terminal:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.step, info="")

    def event(self, record: dict) -> None:
        if self.quiet or not self.main:
            return
        if "eval" in record:
            e = record["eval"]
            line = f"step {record['step']}: val mIoU {e['mIoU']:.4f}  pixAcc {e['pixAcc']:.4f}"
        else:
            line = (f"step {record['step']}: loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                    f"{record['images_per_s']:.1f} img/s")
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], info=line)
            if "eval" in record:
                self.progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="Any --model value predict takes (a trained checkpoint, clip-dense, ...)."),
    data: str = typer.Option(..., "--data", "-d", help="ade20k, folder:PATH or synthetic."),
    split: str = typer.Option("val", "--split", help="train or val."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Other names for the dataset's classes, one per class in its order (zero-shot renaming)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where ade20k lives. Default: $SEGCLI_DATA, else ./data."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Model input size. Default: the model's."),
    ms_flip: bool = typer.Option(False, "--ms-flip", help="Sum logits over scales 0.5-1.75 and horizontal flips (as LSeg evaluates)."),
    short_side: Optional[int] = typer.Option(None, "--short-side", help=SHORT_SIDE_HELP),
    window: Optional[int] = typer.Option(None, "--window", help=WINDOW_HELP),
    stride: Optional[int] = typer.Option(None, "--stride", help=STRIDE_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="As in predict: a template with {} or a named set (imagenet80)."),
    refine: str = typer.Option("auto", "--refine", help="As in predict: pamr, none, or auto (pamr for naclip models)."),
    synonyms: Optional[str] = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    bg_threshold: Optional[float] = typer.Option(None, "--bg-threshold", help=BG_THRESHOLD_HELP),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("auto", "--precision", help="As in predict."),
    seed: int = typer.Option(0, "--seed", help="The synthetic dataset's seed."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the metrics JSON here (default: stdout only with --json)."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout instead of a table."),
) -> None:
    """Pixel accuracy, mIoU and per-class IoU over a whole split (one confusion matrix)."""
    from segcli.api import Segmenter
    from segcli.data.segmentation import open_dataset
    from segcli.evaluate import evaluate
    from segcli.fileio import atomic_write_json
    from segcli.labels import parse_labels

    dataset = open_dataset(data, data_root, seed=seed)
    label_set = parse_labels(labels) if labels else None
    seg = Segmenter.from_pretrained(model, device=device, precision=precision, imgsz=imgsz, warn=False)
    _read_images_as(seg, short_side, window, stride, synonyms, bg_threshold)
    result = evaluate(seg, dataset, split, label_set, batch_size=batch_size, ms_flip=ms_flip, prompt=prompt, refine=refine)
    result["model"] = model
    if output:
        atomic_write_json(output, result)
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    from rich.table import Table

    table = Table(title=f"{model} on {dataset.name} ({split}, {result['images']} images)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in result["per_class"].items():
        table.add_row(name, "-" if iou is None else f"{iou:.4f}")
    table.add_section()
    table.add_row("mIoU", f"{result['mIoU']:.4f}")
    table.add_row("pixAcc", f"{result['pixAcc']:.4f}")
    Console(highlight=False).print(table)


@app.command()
@user_errors
def export(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Any --model value predict takes (checkpoint, clip-dense, ...)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (runs on onnxruntime, TensorRT, ...) or pt2 (torch.export)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help="Bake these labels in (outputs logits and label map). Without: open vocabulary, label embeddings are a second input."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="The fixed input size. Default: the model's."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path. Default: MODELNAME.onnx / .pt2 here."),
    half: bool = typer.Option(False, "--half", help="fp16 artifact (verified with a looser tolerance: 99% argmax agreement)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template for baked labels (as in predict)."),
) -> None:
    """Export a model to ONNX or .pt2 with a JSON sidecar; verified against PyTorch before it is written."""
    from segcli.api import Segmenter
    from segcli.export import export_model

    seg = Segmenter.from_pretrained(model, device="cpu", precision="fp32", imgsz=imgsz, warn=False)
    label_set = seg.resolve_labels(labels) if labels else None
    stem = Path(model).stem if Path(model).suffix else model.replace(":", "_").replace("@", "_")
    out = output or Path(f"{stem}.{fmt}")
    report = export_model(seg.model, out, fmt, label_set, seg.imgsz, half, prompt, source=model)
    print(f"exported {model} -> {report.path} ({report.sidecar.name}"
          + (f", {report.text_weights.name}" if report.text_weights else "")
          + f"); verified: argmax agreement {report.agreement:.4%}, max logit difference {report.max_logit_diff:.3g}",
          file=sys.stderr)


@app.command("embed-labels")
@user_errors
def embed_labels_command(
    labels: str = typer.Option(..., "--labels", "-l", help='Labels as in predict: "road,car,sky", synonyms with ;, @file.txt, ade20k.'),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="The model whose text space to use (checkpoint, clip-dense, or an open-vocabulary .onnx export)."),
    output: Path = typer.Option(..., "--output", "-o", help="FILE.npy: float32 [K, C], L2-normalised (labels in FILE.json)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template (default: the model's)."),
) -> None:
    """Write label embeddings for an open-vocabulary export: serve new labels without PyTorch."""
    from segcli.api import Segmenter
    from segcli.export import write_label_embeddings
    from segcli.labels import parse_labels

    seg = Segmenter.from_pretrained(model, device="cpu", precision="fp32", warn=False)
    path, shape = write_label_embeddings(seg.model, parse_labels(labels), output, prompt, source=model)
    print(f"wrote {shape[0]} label embeddings [{shape[0]}, {shape[1]}] -> {path}", file=sys.stderr)


data_app = typer.Typer(help="Datasets: make synthetic ones.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
@user_errors
def data_synth(
    output: Path = typer.Argument(..., help="Folder to write (the folder: layout)."),
    train_count: int = typer.Option(400, "--train", min=1, help="Training scenes."),
    val_count: int = typer.Option(100, "--val", min=1, help="Validation scenes."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives the same scenes."),
) -> None:
    """Write procedurally drawn scenes with masks: OUT/{train,val}/{images,masks}/*.png, OUT/classes.txt."""
    from segcli.data.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(output, train_count, val_count, seed)
    print(f"wrote {train_count} + {val_count} scenes -> {out} (use --data folder:{out})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Usage mistakes (unknown option, value out of range, missing argument) get one line
    and exit status 2, like every other user error, instead of click's multi-line panel."""
    # OpenMP threads that spin after each parallel op burn a core for nothing while the host side
    # works (measured: a third of predict's CPU time per photo); sleeping costs the model ~1%
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from typer._click.exceptions import UsageError  # recent typer vendors click
    except ImportError:  # older typer: click itself
        from click.exceptions import UsageError

    try:
        code = app(args=argv, standalone_mode=False)
    except UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "segcli"
        print(f"error: {exc.format_message()} (see '{command} --help')", file=sys.stderr)
        code = 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
