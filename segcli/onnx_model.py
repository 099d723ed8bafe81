"""An exported ONNX model run by onnxruntime, behind the interface `Segmenter` uses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segcli.errors import SegcliError
from segcli.labels import LabelSet


@dataclass(frozen=True)
class OnnxConfig:
    name: str
    default_imgsz: int
    input_multiple: int
    embed_dim: int


class OnnxModel:
    """`segcli export` output (FILE.onnx + FILE.json sidecar [+ FILE.text.safetensors])."""

    def __init__(self, path: str | Path):
        from segcli.export import onnx_session

        path = Path(path)
        sidecar = path.with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SegcliError(f"{path}: its sidecar {sidecar.name} is missing or unreadable (export with segcli export)") from None
        if meta.get("format") != "segcli-export/1":
            raise SegcliError(f"{sidecar} is not a segcli export sidecar")
        self.path, self.meta = path, meta
        self.session = onnx_session(path)
        self.open_vocab = meta["mode"] == "open-vocabulary"
        self.dtype = np.float16 if meta["dtype"] == "float16" else np.float32
        self.output_stride = meta["output_stride"]
        self.logit_scale = meta["logit_scale"]
        self.default_prompt = meta.get("prompt")
        self.fixed_imgsz = meta["imgsz"]
        embed_dim = meta["label_embeddings"]["shape"][1] if self.open_vocab else 0
        self.cfg = OnnxConfig(name=meta["architecture"], default_imgsz=meta["imgsz"], input_multiple=1, embed_dim=embed_dim)
        self.labels = LabelSet.from_json(meta["labels"]) if meta.get("labels") else None
        self._text_encoder = None
        self._cache: dict = {}

    def to(self, device) -> "OnnxModel":
        return self  # onnxruntime picks its own execution provider

    def eval(self) -> "OnnxModel":
        return self

    def label_embeddings(self, labels: LabelSet, prompt: str | None = None) -> torch.Tensor:
        """[K,C] for open-vocabulary exports (the saved text tower); baked exports accept only their labels."""
        if not self.open_vocab:
            if self.labels is None or labels.synonyms != self.labels.synonyms:
                baked = ",".join(self.labels.names) if self.labels else "?"
                raise SegcliError(f"{self.path.name} has its labels baked in ({baked[:80]}); export without "
                                  "--labels for an open-vocabulary model")
            return torch.zeros(len(labels), 0)
        key = (labels.synonyms, prompt)
        if key not in self._cache:
            from segcli.modeling.pixel_text import embed_labels

            self._cache[key] = embed_labels(self._text(), labels, prompt)
        return self._cache[key]

    def _text(self):
        if self._text_encoder is None:
            from segcli.export import load_text_tower

            self._text_encoder = load_text_tower(self.path.with_name(self.meta["text_weights"]))
        return self._text_encoder

    def dense_logits(self, images: torch.Tensor, label_embeddings: torch.Tensor, autocast_dtype=None,
                     return_embeddings: bool = False) -> tuple[torch.Tensor, None]:
        """As PixelTextModel.dense_logits: [B,3,S,S] in [0,1] -> (logits [B,K,S/s,S/s] fp32, None).
        The graph's own dtype applies (autocast does not); it has no embeddings output."""
        feeds = {"images": images.cpu().numpy().astype(self.dtype)}
        if self.open_vocab:
            feeds["label_embeddings"] = label_embeddings.cpu().numpy().astype(self.dtype)
        logits = self.session.run(["logits"], feeds)[0]
        return torch.from_numpy(logits.astype(np.float32)), None
