"""Reading weight files segcli did not write (LSeg .ckpt, open_clip .bin/.safetensors). Never runs code.

Pickled files go through torch's weights-only unpickler, which admits tensors, storages and plain
containers. The one class object PyTorch Lightning stores (ModelCheckpoint, as a dict key in
"callbacks") is replaced by an inert stand-in. Any other pickled global is refused by name.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segcli.errors import SegcliError

# what a --model value that names a weights file ends with
WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx"}
_LIGHTNING_CALLBACK = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class _InertStandIn:
    """Takes the place of Lightning's ModelCheckpoint class object; has no behaviour."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a pickled state dict (bare, or under "state_dict")."""
    path = Path(path)
    if not path.is_file():
        raise SegcliError(f"weights file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SegcliError(f"{path} is not a valid safetensors file ({exc})") from None
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format, or a bare pickle
        raise SegcliError(f"{path} is not a PyTorch checkpoint or safetensors file")
    try:
        with torch.serialization.safe_globals([(_InertStandIn, _LIGHTNING_CALLBACK)]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise SegcliError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:120]})") from None
        raise SegcliError(f"refusing {path}: it holds a pickled {found.group(1)}, which could run code "
                          "(only tensors and plain containers are loaded)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise SegcliError(f"{path} is not a readable PyTorch checkpoint: {str(exc).splitlines()[0][:200]}") from None
    # a bare state dict, Lightning's ("state_dict") or detectron2's ("model": CAT-Seg's releases)
    state = None
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj.get("model") if isinstance(obj.get("model"), dict) else obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegcliError(f"{path} has no state_dict of tensors")
    return state
