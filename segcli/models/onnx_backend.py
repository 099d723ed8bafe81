"""An exported ONNX model run by onnxruntime, behind `segcli.modeling.backend.DenseBackend`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from segcli.errors import SegcliError
from segcli.modeling.backend import Capabilities
from segcli.vocabulary.labels import LabelSet

EXPORT_FORMAT = "segcli-export/1"  # the JSON sidecar beside FILE.onnx / FILE.pt2
TEXT_TOWER_FORMAT = "segcli-text-tower/1"  # FILE.text.safetensors: an open-vocabulary export's text tower


def read_sidecar(path: Path) -> dict:
    """The JSON sidecar `segcli export` wrote beside FILE.onnx (FILE.json)."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SegcliError(f"{path}: its sidecar {sidecar.name} is missing or unreadable (export with segcli export)") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise SegcliError(f"{sidecar} is not a segcli export sidecar")
    return meta


def onnx_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SegcliError("running ONNX models needs onnxruntime: pip install 'segcli[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())


def load_text_tower(path: Path):
    """The TextEncoder saved beside an open-vocabulary export."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from segcli.modeling.configs import TextConfig
    from segcli.modeling.text_encoder import TextEncoder

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SegcliError(f"{path}: the text tower of this export is missing or corrupt ({exc})") from None
    if meta.get("format") != TEXT_TOWER_FORMAT:
        raise SegcliError(f"{path} is not a segcli text tower")
    encoder = TextEncoder(TextConfig(**json.loads(meta["text_config"])))
    encoder.tower.load_state_dict(state, strict=True)
    return encoder


class OnnxModel:
    """`segcli export` output (FILE.onnx + FILE.json sidecar [+ FILE.text.safetensors]).

    Fixed input size (the export's), no pixel embeddings output, not exportable again; open
    vocabulary only when exported without --labels (then the saved text tower embeds new labels).
    """

    input_multiple = 1
    region_generator = None

    def __init__(self, path: str | Path, meta: dict | None = None):
        """`meta`: the sidecar, when the caller has read it already."""
        path = Path(path)
        meta = meta or read_sidecar(path)
        self.path, self.meta = path, meta
        self.session = onnx_session(path)
        self.open_vocabulary = meta["mode"] == "open-vocabulary"
        self.dtype = np.float16 if meta["dtype"] == "float16" else np.float32
        self.architecture = meta["architecture"]
        self.output_stride = meta["output_stride"]
        self.logit_scale = meta["logit_scale"]
        self.default_prompt = meta.get("prompt")
        self.fixed_imgsz = self.default_imgsz = meta["imgsz"]
        self.baked_labels = None if self.open_vocabulary else LabelSet.from_json(meta["labels"])
        self.capabilities = Capabilities(family=meta.get("family", self.architecture), provides_embeddings=False,
                                         exportable=False, limits="an ONNX export")
        self._text_encoder = None
        self._cache: dict = {}

    def to(self, device) -> "OnnxModel":
        return self  # onnxruntime picks its own execution provider

    def eval(self) -> "OnnxModel":
        return self

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor | None:
        """[K,C] for open-vocabulary exports (the saved text tower); None for baked exports, which
        accept only their own labels."""
        if not self.open_vocabulary:
            if labels.synonyms != self.baked_labels.synonyms:
                from segcli.errors import one_line

                raise SegcliError(f"{self.path.name} has its labels baked in ({one_line(','.join(self.baked_labels.names), 80)}); "
                                  "export without --labels for an open-vocabulary model")
            return None
        key = (labels.synonyms, prompt)
        if key not in self._cache:
            from segcli.modeling.pixel_text import embed_labels

            self._cache[key] = embed_labels(self._text(), labels, prompt)
        return self._cache[key]

    def _text(self):
        if self._text_encoder is None:
            self._text_encoder = load_text_tower(self.path.with_name(self.meta["text_weights"]))
        return self._text_encoder

    def dense_logits(self, images: torch.Tensor, label_embeddings: torch.Tensor | None, autocast_dtype=None,
                     return_embeddings: bool = False) -> tuple[torch.Tensor, None]:
        """As PixelTextModel.dense_logits: [B,3,S,S] in [0,1] -> (logits [B,K,S/s,S/s] fp32, None).
        The graph's own dtype applies (autocast does not); it has no embeddings output."""
        feeds = {"images": images.cpu().numpy().astype(self.dtype)}
        if self.open_vocabulary:
            feeds["label_embeddings"] = label_embeddings.cpu().numpy().astype(self.dtype)
        logits = self.session.run(["logits"], feeds)[0]
        return torch.from_numpy(logits.astype(np.float32)), None
