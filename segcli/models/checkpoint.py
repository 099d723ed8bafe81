"""Checkpoints: one safetensors file (text tower included) + JSON metadata. Never unpickles.

The metadata records the model family (a row of `segcli.modeling.configs.FAMILIES`) and its config, so any
family saves and loads the same way. Training state (weights + optimizer moments + progress) is a
safetensors file too, so resuming never unpickles either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from segcli.errors import SegcliError, mismatch_detail
from segcli.files.atomic import atomic_path
from segcli.modeling.pixel_text import PixelTextModel, build_from_state_dict
from segcli.models.families import get_family
from segcli.version import __version__
from segcli.vocabulary.labels import LabelSet

FORMAT = "segcli-checkpoint/1"
LEGACY_FAMILY = "lseg"  # checkpoints written before families were recorded hold an LSeg


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself."""

    path: Path
    family: str
    config: object  # the family's config dataclass
    labels: LabelSet | None
    metadata: dict = field(default_factory=dict)


def save_checkpoint(model: PixelTextModel, path: str | os.PathLike, labels: LabelSet | None = None,
                    extra: dict | None = None) -> Path:
    """Write `model` (all weights) with its family, config and labels as JSON metadata, atomically."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "segcli_version": __version__,
        "family": model.capabilities.family,
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


def _read_metadata(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return None


def is_segcli_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a safetensors file carries segcli metadata (False for other safetensors files)."""
    return (_read_metadata(Path(path)) or {}).get("format") == FORMAT


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the header: family, config, labels and metadata (cheap even for GB-sized files)."""
    path = Path(path)
    if not path.is_file():
        raise SegcliError(f"model file not found: {path}")
    metadata = _read_metadata(path)
    if metadata is None:
        raise SegcliError(f"{path} is not a valid safetensors checkpoint")
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise SegcliError(f"{path} is a safetensors file but not a segcli checkpoint (no segcli metadata)")
    family = get_family(metadata.get("family", LEGACY_FAMILY))
    try:
        config = family.config.from_dict(json.loads(metadata["config"]))
        labels = (LabelSet.from_json(json.loads(metadata["labels"]), metadata.get("label_source", "custom"))
                  if "labels" in metadata else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise SegcliError(f"{path} has corrupt segcli metadata ({exc})") from None
    return CheckpointInfo(path=path, family=family.name, config=config, labels=labels, metadata=metadata)


def count_parameters(path: str | os.PathLike) -> int:
    """Number of values stored in a safetensors file, from its header alone."""
    with safe_open(str(path), framework="pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[PixelTextModel, CheckpointInfo]:
    """Rebuild the model from a checkpoint's family and config and load its weights (strict)."""
    info = read_checkpoint_info(path)
    try:
        state = load_file(str(info.path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SegcliError(f"{info.path} is corrupt: {exc}") from None
    try:
        model = build_from_state_dict(get_family(info.family).model_class(), info.config, state, device)
    except RuntimeError as exc:
        raise SegcliError(f"{info.path} does not match its architecture {info.config.name}: {mismatch_detail(exc)}") from None
    return model, info


def save_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        progress: dict) -> None:
    """Weights, optimizer moments and `progress` (JSON) in one atomically written safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"optim.{index}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).cpu().contiguous()
    meta = {**progress, "param_groups": opt["param_groups"], "segcli_version": __version__}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"trainer": json.dumps(meta)})


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_training_state` wrote into `model` and `optimizer`; returns the progress."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["trainer"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SegcliError(f"{path} is corrupt ({exc}); nothing to resume from") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta
