"""Checkpoints: one safetensors file (text tower included) + JSON metadata. Never unpickles."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from segcli import __version__
from segcli.errors import SegcliError
from segcli.fileio import atomic_path
from segcli.labels import LabelSet
from segcli.modeling.lseg import LSeg, model_from_state_dict
from segcli.registry import LSegConfig

FORMAT = "segcli-checkpoint/1"


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself."""

    path: Path
    config: LSegConfig
    labels: LabelSet | None
    metadata: dict = field(default_factory=dict)


def save_checkpoint(model: LSeg, path: str | os.PathLike, labels: LabelSet | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` (all weights) with its config and labels as JSON metadata, atomically."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "segcli_version": __version__,
        "config": json.dumps(model.cfg.to_dict()),
        "normalization": json.dumps({"mean": list(model.cfg.pixel_mean), "std": list(model.cfg.pixel_std)}),
    }
    if labels is not None:
        metadata["labels"] = json.dumps(labels.to_json(), ensure_ascii=False)
        metadata["label_source"] = labels.source
    for key, value in (extra or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def is_segcli_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a safetensors file carries segcli metadata (False for other safetensors files)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the header: config, labels and metadata (cheap even for GB-sized files)."""
    path = Path(path)
    if not path.is_file():
        raise SegcliError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise SegcliError(f"{path} is not a valid safetensors checkpoint ({exc})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise SegcliError(f"{path} is a safetensors file but not a segcli checkpoint (no segcli metadata)")
    try:
        config = LSegConfig.from_dict(json.loads(metadata["config"]))
        labels = (LabelSet.from_json(json.loads(metadata["labels"]), metadata.get("label_source", "custom"))
                  if "labels" in metadata else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise SegcliError(f"{path} has corrupt segcli metadata ({exc})") from None
    return CheckpointInfo(path=path, config=config, labels=labels, metadata=metadata)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LSeg, CheckpointInfo]:
    """Rebuild the model from a checkpoint's config and load its weights (strict)."""
    info = read_checkpoint_info(path)
    try:
        state = load_file(str(info.path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SegcliError(f"{info.path} is corrupt: {exc}") from None
    try:
        model = model_from_state_dict(info.config, state, device)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise SegcliError(f"{info.path} does not match its architecture {info.config.name}: "
                          f"{' '.join(first[1:2]).strip()[:200]}") from None
    return model, info
