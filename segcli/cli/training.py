"""`segcli train`, `eval` and `data`: training LSeg, measuring any model on a dataset, datasets."""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from segcli.cli.common import (
    BG_THRESHOLD_HELP,
    SHORT_SIDE_HELP,
    STRIDE_HELP,
    SYNONYMS_HELP,
    WINDOW_HELP,
    fail,
    read_images_as,
    user_errors,
)
from segcli.cli.progress import TrainProgress
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


def _train_signature() -> None:
    extra = [
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--resume", help="Continue the killed or finished run in this folder (its own settings; --time-limit may change).")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="No progress output.")),
    ]
    train.__signature__, train.__annotations__ = _options_signature(TrainOptions, extra)


_train_signature()
train_command = user_errors(train)  # what the app registers as `segcli train`


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
    from segcli.data.labels import parse_labels
    from segcli.data.segmentation import open_dataset
    from segcli.files.atomic import atomic_write_json
    from segcli.inference.segmenter import Segmenter
    from segcli.training.evaluate import evaluate

    dataset = open_dataset(data, data_root, seed=seed)
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


data_app = typer.Typer(help="Datasets: make synthetic ones.", no_args_is_help=True)


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
