"""`segcli convert`: foreign weights a family can map (an official LSeg .ckpt, open_clip CLIP weights)
-> a segcli checkpoint holding the same model. Reading never runs code from the file."""

from __future__ import annotations

from pathlib import Path

import torch

from segcli.errors import SegcliError
from segcli.modeling.pixel_text import PixelTextModel
from segcli.models.checkpoint import save_checkpoint
from segcli.models.factory import load_model, resolve_model
from segcli.vocabulary.labels import LabelSet


def convert_weights(src: str | Path, dst: str | Path) -> tuple[Path, PixelTextModel, LabelSet | None]:
    """Any foreign weights a family can map (an official LSeg .ckpt, open_clip CLIP weights) -> a segcli
    checkpoint holding the same model (LSeg: labelled with the ADE20K classes it was trained on)."""
    spec = resolve_model(str(src))
    if spec.kind != "weights":
        raise SegcliError(f"{src} is {spec.kind_text}; convert takes an LSeg .ckpt or open_clip CLIP weights")
    loaded = load_model(spec, torch.device("cpu"))
    out = save_checkpoint(loaded.backend, dst, labels=loaded.labels, extra={"converted_from": Path(src).name})
    return out, loaded.backend, loaded.labels
