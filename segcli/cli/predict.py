"""`segcli predict`, `relabel` and `search`: photos (or their stored embeddings) to masks and answers."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from segcli.cli.common import fail, options_signature, user_errors, warn
from segcli.cli.progress import PredictProgress
from segcli.errors import SegcliError
from segcli.pipeline.options import PROMPT_HELP, SYNONYMS_HELP, PredictOptions


def predict(sources: Optional[List[str]] = None, json_lines: bool = False, quiet: bool = False,
            merge_summaries: Optional[Path] = None, **options) -> None:
    """Segment photos: writes NAME_mask.png, NAME_color.png, NAME_overlay.jpg, labels.json, summary.json."""
    from segcli.pipeline.launch import prepare_predict, run_predict
    from segcli.pipeline.run_folder import merge_summaries as merge

    if merge_summaries is not None:
        merged = merge(merge_summaries)
        print(f"merged {len(merged['merged_from'])} shard summaries: {merged['counts']['ok']} ok, "
              f"{merged['counts']['failed']} failed -> {merge_summaries / 'summary.json'}", file=sys.stderr)
        return
    if not sources:
        raise SegcliError("no SOURCE given: pass image files, folders, globs, lists or - (see 'segcli predict --help')")
    opts = PredictOptions(**options)
    prepared = prepare_predict(opts, sources, stdin=sys.stdin, notify=None if quiet else _note, warn=warn)
    found = prepared.inputs
    reporter = PredictProgress(total=len(found.sources), quiet=quiet, json_lines=json_lines)
    with reporter:
        result = run_predict(prepared.segmenter, prepared.run_options, found, stager=prepared.stager,
                             on_record=reporter.record, on_frames=reporter.frames, engine=opts.engine)
    if result.interrupted:
        raise fail(f"interrupted: {len(result.records)} of {len(found.sources)} done; run again to finish", 130)
    if not quiet:
        ok = len(result.records) - result.failed
        skipped = f", {len(found.skipped)} non-image file(s) skipped (see summary.json)" if found.skipped else ""
        print(f"done: {ok} ok, {result.failed} failed, {result.reused} already done{skipped} -> {result.output}",
              file=sys.stderr)
    if result.failed:
        raise typer.Exit(1)


def _note(message: str) -> None:
    """What a run decided before it started (batch size, compiling): stderr, unless --quiet."""
    print(message, file=sys.stderr)


def _predict_signature() -> None:
    def keyword(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    sources = inspect.Parameter("sources", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[List[str]],
                                default=typer.Argument(None, help="Image and video files, folders (recursive), globs, "
                                                                  ".txt lists of paths, or - (paths on stdin)."))
    extra = [
        keyword("json_lines", bool, typer.Option(False, "--json", help="Print one JSON line per image on stdout.")),
        keyword("quiet", bool, typer.Option(False, "--quiet", "-q", help="No progress output (errors are still reported).")),
        keyword("merge_summaries", Optional[Path], typer.Option(
            None, "--merge-summaries", help="Fold DIR/summary.shard-*.json of finished shards into DIR/summary.json and exit.")),
    ]
    signature, annotations = options_signature(PredictOptions, extra)
    predict.__signature__ = signature.replace(parameters=[sources, *signature.parameters.values()])
    predict.__annotations__ = {"sources": sources.annotation, **annotations}


_predict_signature()
predict_command = user_errors(predict)  # what the app registers as `segcli predict`


@user_errors
def relabel(
    folder: Path = typer.Argument(..., help="A predict run's DIR that holds stored embeddings (--save embeddings)."),
    labels: str = typer.Option(..., "--labels", "-l", help=('The new labels: "road,car,sky", synonyms "road;street", @file.txt, or a '
            'named set.')),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder. Default: a new runs/relabel/N."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=("The model that made the embeddings, when it moved (default: the one "
            "DIR records).")),
    save: str = typer.Option("mask,color,overlay", "--save", help=("Which outputs to write: any of mask,color,overlay (overlays need the "
            "original photos).")),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=PROMPT_HELP),
    synonyms: Optional[str] = typer.Option(None, "--synonyms", help=SYNONYMS_HELP),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colors."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1, help="Worker processes for label maps, rendering and writing."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every photo, replacing results made with other settings."),
    json_lines: bool = typer.Option(False, "--json", help="Print one JSON line per photo on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output (errors are still reported)."),
) -> None:
    """Predict's outputs for new labels from stored embeddings, without running the image encoder."""
    from segcli.pipeline.relabel import relabel_run, relabel_segmenter
    from segcli.pipeline.run import RunOptions
    from segcli.postprocess.outputs import parse_outputs
    from segcli.vocabulary.labels import parse_labels

    label_set = parse_labels(labels)
    kinds = parse_outputs(save)
    seg, stored = relabel_segmenter(folder, model, device, synonyms)
    options = RunOptions(labels=label_set, prompt=prompt, output=output, save=kinds, alpha=alpha, workers=workers,
                             overwrite=overwrite)
    reporter = PredictProgress(total=len(stored), quiet=quiet, json_lines=json_lines)
    run = relabel_run(seg, options, stored, folder, on_record=reporter.record)
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
    against: Optional[str] = typer.Option(None, "--against", help=("The labels a query must beat at a pixel (default: the labels the run "
            "was made with).")),
    top: Optional[int] = typer.Option(None, "--top", "-n", min=1, help="Only the N best photos per query."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model that made the embeddings, when it moved."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template for the queries and labels."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line: query, score, cells, path, embeddings."),
) -> None:
    """Rank stored photos by the fraction of their pixels where a query wins: SCORE<TAB>PATH, best first."""
    from segcli.embeddings.search import run_labels
    from segcli.embeddings.search import search as run_search
    from segcli.embeddings.stored import recorded_model
    from segcli.inference.segmenter import Segmenter
    from segcli.vocabulary.labels import parse_labels

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
