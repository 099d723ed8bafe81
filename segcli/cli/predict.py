"""`segcli predict`, `relabel` and `search`: photos (or their stored embeddings) to masks and answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from segcli.cli.common import (
    BG_THRESHOLD_HELP,
    SHORT_SIDE_HELP,
    STRIDE_HELP,
    SYNONYMS_HELP,
    WINDOW_HELP,
    fail,
    read_images_as,
    user_errors,
    warn,
)
from segcli.cli.progress import PredictProgress
from segcli.errors import SegcliError
from segcli.models.families import DEFAULT_MODEL


@user_errors
def predict(
    sources: Optional[List[str]] = typer.Argument(None, help="Image and video files, folders (recursive), globs, .txt lists of paths, or - (paths on stdin)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help='Labels: "road,car,sky", synonyms "road;street", @file.txt, or a named set (ade20k). Default: the labels the checkpoint was trained on.'),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="clip-dense[:ARCH[@TAG]] (training-free CLIP, the default: clip-dense:ViT-B-16), a segcli checkpoint (.safetensors), an LSeg .ckpt, an open_clip weights file, or an architecture name (untrained, for smoke tests)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder, or a URL in object storage (s3://bucket/masks: files uploaded whole as they are made). Default: a new runs/predict/N."),
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
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Images (or windows) per forward pass. Default: 8 on a CPU; on a GPU the size at which the model's throughput stops rising, measured before the run (a few seconds)."),
    short_side: Optional[int] = typer.Option(None, "--short-side", help=SHORT_SIDE_HELP),
    window: Optional[int] = typer.Option(None, "--window", help=WINDOW_HELP),
    stride: Optional[int] = typer.Option(None, "--stride", help=STRIDE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Worker processes for decoding, label maps, rendering and writing (each uses one core). Default: 2 with the model on the CPU, all cores but one (at most 16) on a GPU."),
    postprocess: str = typer.Option("host", "--postprocess", help="Where the full-size work (label map, colors, overlay) runs: host (the worker processes; auto means the same), device (torch on the model's device)."),
    decode: str = typer.Option("auto", "--decode", help="Where plain JPEGs are decoded and resized for the model: host (the worker processes), device (in batches on the model's device: nvJPEG on CUDA; other files, progressive and CMYK JPEGs stay on the host), auto (default): device on a GPU, host elsewhere."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 on CUDA, bf16 on CPUs with native bf16), fp32, bf16, fp16, or int8 (CPU: the image branch's linear layers in dynamic int8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every image, replacing results made with other settings."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", min=1, help="Refuse larger images (decompression bombs)."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON line per image on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors are still reported)."),
    compile_model: str = typer.Option("auto", "--compile", help="on: compile the image branch first (torch.compile; on a CPU with frozen, prepacked weights): 1.1-2x the model's speed on this project's CPU, for 20-30 s once per run; auto (default): on from 500 photos, and if compiling fails the run goes on uncompiled; off."),
    engine: str = typer.Option("local", "--engine", help="local: this machine's processes; ray: Ray Data over the cluster RAY_ADDRESS names (else a local Ray): decoding and writing in CPU tasks, the model in an actor pool, one GPU per actor where there are GPUs (pip install 'segcli[ray]')."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: take a deterministic 1/N of the sorted inputs (shards 0..N-1 into one --output, then --merge-summaries). Under torchrun: the rank."),
    merge_summaries: Optional[Path] = typer.Option(None, "--merge-summaries", help="Fold DIR/summary.shard-*.json of finished shards into DIR/summary.json and exit."),
) -> None:
    """Segment photos: writes NAME_mask.png, NAME_color.png, NAME_overlay.jpg, labels.json, summary.json."""
    from segcli.data.labels import parse_labels
    from segcli.inference.device import rank_device
    from segcli.inference.segmenter import Segmenter
    from segcli.models.factory import UNTRAINED_WARNING
    from segcli.pipeline.launch import find_inputs, run_predict, shard_of_this_process
    from segcli.pipeline.run import PredictOptions
    from segcli.pipeline.run_folder import merge_summaries as merge
    from segcli.postprocess.outputs import parse_outputs

    if merge_summaries is not None:
        merged = merge(merge_summaries)
        print(f"merged {len(merged['merged_from'])} shard summaries: {merged['counts']['ok']} ok, "
              f"{merged['counts']['failed']} failed -> {merge_summaries / 'summary.json'}", file=sys.stderr)
        return
    if not sources:
        raise SegcliError("no SOURCE given: pass image files, folders, globs, lists or - (see 'segcli predict --help')")
    from segcli.files.remote import is_url
    from segcli.pipeline.device_inputs import check_decode
    from segcli.pipeline.launch import check_compile, check_engine

    check_engine(engine, decode)  # before the model loads
    check_compile(compile_model)
    check_decode(decode)
    output = output if output is None or is_url(output) else Path(output)
    shard_spec = shard_of_this_process(shard, output)
    kinds = parse_outputs(save)
    label_set = parse_labels(labels) if labels is not None else None
    found = find_inputs(sources, output, shard_spec, sys.stdin)
    model = model or DEFAULT_MODEL
    seg = Segmenter.from_pretrained(model, device=str(rank_device(device)), precision=precision, imgsz=imgsz, warn=False)
    read_images_as(seg, short_side, window, stride, synonyms, bg_threshold)
    if seg.untrained:
        warn(UNTRAINED_WARNING.format(name=model))
    label_set = seg.resolve_labels(label_set)
    from segcli.pipeline.launch import should_compile

    if batch_size is None:
        batch_size, rates = seg.find_batch_size()
        if rates and not quiet:
            shown = ", ".join(f"{b}: {r:.0f}" if r else f"{b}: out of memory" for b, r in rates.items())
            print(f"batch size {batch_size} (images/s by batch size: {shown})", file=sys.stderr)

    if should_compile(compile_model, seg, sum(not s.video for s in found.sources)):
        try:
            seconds = seg.use_compile(batch_size)
            if not quiet:
                print(f"compiled the model for batches of {batch_size} in {seconds:.1f} s", file=sys.stderr)
        except SegcliError as exc:
            if compile_model == "on":
                raise
            warn(f"{exc}; running it uncompiled")
    options = PredictOptions(labels=label_set, prompt=prompt, output=output, save=kinds, alpha=alpha,
                             batch_size=batch_size, workers=workers, overwrite=overwrite, max_pixels=max_pixels,
                             shard=shard_spec, postprocess=postprocess, embed_dtype=embed_dtype, embed_stride=embed_stride,
                             vid_stride=vid_stride, smooth=smooth, refine=refine, decode=decode)
    reporter = PredictProgress(total=len(found.sources), quiet=quiet, json_lines=json_lines)
    with reporter:
        result = run_predict(seg, options, found, on_record=reporter.record, on_frames=reporter.frames, engine=engine)
    if result.interrupted:
        raise fail(f"interrupted: {len(result.records)} of {len(found.sources)} done; run again to finish", 130)
    if not quiet:
        ok = len(result.records) - result.failed
        skipped = f", {len(found.skipped)} non-image file(s) skipped (see summary.json)" if found.skipped else ""
        print(f"done: {ok} ok, {result.failed} failed, {result.reused} already done{skipped} -> {result.output}",
              file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


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
    from segcli.data.labels import parse_labels
    from segcli.pipeline.relabel import RelabelRun, relabel_segmenter
    from segcli.pipeline.run import PredictOptions
    from segcli.postprocess.outputs import parse_outputs

    label_set = parse_labels(labels)
    kinds = parse_outputs(save)
    seg, stored = relabel_segmenter(folder, model, device, synonyms)
    options = PredictOptions(labels=label_set, prompt=prompt, output=output, save=kinds, alpha=alpha, workers=workers,
                             overwrite=overwrite)
    reporter = PredictProgress(total=len(stored), quiet=quiet, json_lines=json_lines)
    run = RelabelRun(seg, options, stored, folder, on_record=reporter.record)
    with reporter:
        result = run.run()
    if result.interrupted:
        raise fail(f"interrupted: {len(result.records)} of {len(stored)} done; run again to finish", 130)
    if not quiet:
        ok = len(result.records) - result.failed
        print(f"done: {ok} ok, {result.failed} failed, {result.reused} already done -> {result.output}", file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


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
    from segcli.data.labels import parse_labels
    from segcli.embeddings.search import run_labels
    from segcli.embeddings.search import search as run_search
    from segcli.embeddings.stored import recorded_model
    from segcli.inference.segmenter import Segmenter

    queries = [q.strip() for q in query if q.strip()]
    if not queries:
        raise SegcliError("--query is empty: say what to look for")
    rivals = parse_labels(against) if against is not None else run_labels(folder)
    seg = Segmenter.from_pretrained(model or recorded_model(folder), device=device, warn=False)
    hits = run_search(folder, queries, rivals, seg, prompt, top)
    for q in queries:
        for hit in hits[q]:
            if json_out:
                print(json.dumps({"query": hit.query, "score": round(hit.score, 6), "cells": hit.cells, "path": hit.path,
                                  "embeddings": hit.embeddings}, ensure_ascii=False))
            else:
                print(f"{hit.score:.4f}\t" + (f"{hit.query}\t" if len(queries) > 1 else "") + hit.path)
