"""`segcli train` and `eval`: training LSeg, measuring any model on a dataset."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from segcli.cli.common import fail, options_signature, read_images_as, user_errors
from segcli.cli.progress import TrainProgress
from segcli.errors import SegcliError
from segcli.pipeline.options import BG_THRESHOLD_HELP, SHORT_SIDE_HELP, STRIDE_HELP, SYNONYMS_HELP, WINDOW_HELP
from segcli.training.options import TrainOptions


def train(resume: Optional[Path] = None, quiet: bool = False, **options) -> None:
    """Train LSeg: image encoder + DPT decoder against ground-truth masks; CLIP text stays frozen."""
    from segcli.training.trainer import resume_training, start_training

    reporter = TrainProgress(quiet)
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
        raise fail(f"interrupted at step {result.steps}; the state is saved: segcli train --resume {result.output}", 130)
    if trainer.dist.main and not quiet:
        best = result.best or {}
        print(f"done ({result.stopped_by}): {result.steps} steps, best val mIoU {best.get('mIoU', 0):.4f} "
              f"at step {best.get('step')} -> {result.output}", file=sys.stderr)


def _train_signature() -> None:
    extra = [
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--resume", help="Continue the killed or finished run in this folder (its own settings; --time-limit may change).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="No progress output.")),
    ]
    train.__signature__, train.__annotations__ = options_signature(TrainOptions, extra)


_train_signature()
train_command = user_errors(train)  # what the app registers as `segcli train`


@user_errors
def eval_command(
    models: List[str] = typer.Option(..., "--model", "-m", help=("Any --model value predict takes (a trained checkpoint, clip-dense, "
            "...); with --benchmark, repeat it for one row per model.")),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=("A catalog dataset (ade20k, voc21, voc20, context60, context59, "
            "coco-stuff, coco-object, cityscapes; see segcli data list), folder:PATH or synthetic.")),
    benchmark: Optional[str] = typer.Option(None, "--benchmark", help=("training-free: the eight datasets the training-free methods "
            "report, each with their authors' settings; one table, a row per --model.")),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images of each split (a smoke run)."),
    download: bool = typer.Option(False, "--download", help="Fetch a missing catalog dataset first (segcli data get)."),
    split: str = typer.Option("val", "--split", help="train or val."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help=("Other names for the dataset's classes, one per class in its order "
            "(zero-shot renaming).")),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help=("Where the datasets live (segcli data get --root). Default: "
            "$SEGCLI_DATA, else ./data.")),
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
    """Pixel accuracy, mIoU and per-class IoU over a whole split (one confusion matrix); or, with
    --benchmark, the papers' table over the eight benchmarks."""
    from segcli.datasets.segmentation import limited, open_dataset
    from segcli.evaluation.evaluate import evaluate
    from segcli.files.atomic import atomic_write_json
    from segcli.inference.segmenter import Segmenter
    from segcli.vocabulary.labels import parse_labels

    if benchmark is not None:
        return _benchmark(models, benchmark, data_root, device, precision, limit, batch_size, output, json_out)
    if data is None:
        raise SegcliError("give --data (or --benchmark training-free)")
    if len(models) > 1:
        raise SegcliError("several --model values make rows of a --benchmark table: give one with --data")
    model = models[0]
    if download:
        _download_if_missing(data, data_root)
    dataset = limited(open_dataset(data, data_root, seed=seed), split, limit)
    label_set = parse_labels(labels) if labels else None
    seg = Segmenter.from_pretrained(model, device=device, precision=precision, imgsz=imgsz, warn=False)
    read_images_as(seg, short_side, window, stride, synonyms, bg_threshold)
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


def _download_if_missing(data: str, data_root: Path | None) -> None:
    from segcli.datasets.catalog import BENCHMARKS
    from segcli.datasets.prepare import default_root, get

    if data in BENCHMARKS:
        folder, what = get(BENCHMARKS[data].download, default_root(data_root))
        print(f"{data}: {what} -> {folder}", file=sys.stderr)


def _benchmark(models: list[str], suite: str, data_root: Path | None, device: str, precision: str, limit: int | None,
               batch_size: int, output: Path | None, json_out: bool) -> None:
    from rich.table import Table

    from segcli.datasets.prepare import default_root
    from segcli.evaluation.benchmark import run_benchmark
    from segcli.files.atomic import atomic_write_json

    def progress(model: str, name: str, metrics: dict) -> None:
        print(f"{model} on {name}: mIoU {metrics['mIoU']:.4f} ({metrics['images']} images)", file=sys.stderr, flush=True)

    result = run_benchmark(models, suite, default_root(data_root), device, precision, limit, batch_size,
                           on_result=None if json_out else progress)
    if output:
        atomic_write_json(output, result)
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        table = Table(title=f"mIoU (%), {suite} benchmarks" + (f", first {limit} images each" if limit else ""))
        table.add_column("model", overflow="fold")
        for name in result["datasets"]:
            table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
        table.add_column("avg", justify="right", no_wrap=True)
        for model, row in result["models"].items():
            cells = [f"{100 * row[n]['mIoU']:.1f}" if row.get(n) else "-" for n in result["datasets"]]
            average = row.get("average")
            table.add_row(model, *cells, f"{100 * average['mIoU']:.1f}" if average else "-")
        console = Console(highlight=False)
        Console(highlight=False, width=max(console.width, 140)).print(table)  # the papers' row on one line
    for name, command in result["missing"].items():
        print(f"missing: {name} (fetch it: {command})", file=sys.stderr)
