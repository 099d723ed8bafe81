"""`segcli info`, `convert`, `export` and `embed-labels`: what a model is, and the model to other formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from segcli.cli.common import user_errors
from segcli.models.families import DEFAULT_MODEL


@user_errors
def info(
    model: str = typer.Argument(..., help=("Any --model value: a checkpoint, an LSeg .ckpt, open_clip weights, an .onnx export, "
            "clip-dense[:ARCH[@TAG]] or an architecture.")),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what a model is: kind, family, architecture, parameters, labels, metadata (never downloads)."""
    from segcli.models.factory import describe_model

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
        text = config["text"]
        rows["text encoder"] = f"CLIP text width {text['width']}, {text['layers']} layers, C = {text['embed_dim']}"
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


@user_errors
def convert(
    source: Path = typer.Argument(..., help=("An official LSeg checkpoint (.ckpt from PyTorch Lightning, or a bare state dict), or "
            "open_clip CLIP weights.")),
    output: Path = typer.Argument(..., help="The segcli checkpoint to write (.safetensors)."),
) -> None:
    """Convert foreign weights (LSeg .ckpt, open_clip CLIP) to a segcli checkpoint, without running code from them."""
    from segcli.models.convert import convert_weights

    out, model, labels = convert_weights(source, output)
    print(f"converted {source} -> {out} (family {model.capabilities.family}, architecture {model.architecture}, "
          f"labels {labels.source if labels else 'none'})", file=sys.stderr)


@user_errors
def export(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Any --model value predict takes (checkpoint, clip-dense, ...)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (runs on onnxruntime, TensorRT, ...) or pt2 (torch.export)."),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help=("Bake these labels in (outputs logits and label map). Without: "
            "open vocabulary, label embeddings are a second input.")),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="The fixed input size. Default: the model's."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path. Default: MODELNAME.onnx / .pt2 here."),
    half: bool = typer.Option(False, "--half", help="fp16 artifact (verified with a looser tolerance: 99% argmax agreement)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template for baked labels (as in predict)."),
) -> None:
    """Export a model to ONNX or .pt2 with a JSON sidecar; verified against PyTorch before it is written."""
    from segcli.inference.segmenter import Segmenter
    from segcli.models.export import artifact_path, export_model

    seg = Segmenter.from_pretrained(model, device="cpu", precision="fp32", imgsz=imgsz, warn=False)
    label_set = seg.resolve_labels(labels) if labels else None
    report = export_model(seg.model, output or artifact_path(model, fmt), fmt, label_set, seg.imgsz, half, prompt, source=model)
    print(f"exported {model} -> {report.path} ({report.sidecar.name}"
          + (f", {report.text_weights.name}" if report.text_weights else "")
          + f"); verified: argmax agreement {report.agreement:.4%}, max logit difference {report.max_logit_diff:.3g}",
          file=sys.stderr)


@user_errors
def embed_labels_command(
    labels: str = typer.Option(..., "--labels", "-l", help='Labels as in predict: "road,car,sky", synonyms with ;, @file.txt, ade20k.'),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=("The model whose text space to use (checkpoint, clip-dense, or an "
            "open-vocabulary .onnx export).")),
    output: Path = typer.Option(..., "--output", "-o", help="FILE.npy: float32 [K, C], L2-normalised (labels in FILE.json)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template (default: the model's)."),
) -> None:
    """Write label embeddings for an open-vocabulary export: serve new labels without PyTorch."""
    from segcli.inference.segmenter import Segmenter
    from segcli.models.export import write_label_embeddings
    from segcli.vocabulary.labels import parse_labels

    seg = Segmenter.from_pretrained(model, device="cpu", precision="fp32", warn=False)
    path, shape = write_label_embeddings(seg.model, parse_labels(labels), output, prompt, source=model)
    print(f"wrote {shape[0]} label embeddings [{shape[0]}, {shape[1]}] -> {path}", file=sys.stderr)
