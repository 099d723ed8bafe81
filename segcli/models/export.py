"""The export engine: ONNX and torch.export (.pt2) artifacts of any segcli model, verified on export.

The graph takes images at one fixed size with a dynamic batch: float32 [B,3,S,S] in [0,1] (resize
and pad outside the graph, as `Segmenter.prepare` does; normalisation is inside). Two modes:
- labels baked in: the normalised label embeddings are a constant; outputs logits [B,K,S/s,S/s]
  and the label map [B,S/s,S/s] (int64, argmax over K);
- open vocabulary: a second input `label_embeddings` [K,C] (L2-normalised, dynamic K; write them
  with `segcli embed-labels`); outputs logits [B,K,S/s,S/s]. The text tower is saved beside the
  model (FILE.text.safetensors) so `segcli predict --model FILE.onnx` can embed new labels.
A JSON sidecar (FILE.json) says what goes in and comes out. Nothing is written unless the exported
artifact agrees with PyTorch (argmax on >= 99.9% of pixels in fp32, >= 99% with --half).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segcli.errors import SegcliError, check_input_size
from segcli.files.atomic import atomic_path, atomic_write_json
from segcli.modeling.pixel_text import PixelTextModel
from segcli.models.onnx_backend import EXPORT_FORMAT, TEXT_TOWER_FORMAT, onnx_session
from segcli.version import __version__
from segcli.vocabulary.labels import LabelSet

FORMATS = ("onnx", "pt2")
MIN_AGREEMENT = {False: 0.999, True: 0.99}  # fp32, --half
ONNX_OPSET = 18


class BakedLabelsGraph(nn.Module):
    """images [B,3,S,S] in [0,1] -> (logits [B,K,S/s,S/s], label map [B,S/s,S/s])."""

    def __init__(self, model: PixelTextModel, label_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("label_embeddings", label_embeddings.detach().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits(self.model.pixel_embeddings(images), self.label_embeddings)
        return logits, logits.argmax(dim=1)


class OpenVocabularyGraph(nn.Module):
    """(images [B,3,S,S] in [0,1], label embeddings [K,C]) -> logits [B,K,S/s,S/s]."""

    def __init__(self, model: PixelTextModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
        return self.model.logits(self.model.pixel_embeddings(images), label_embeddings)


@dataclass
class ExportReport:
    path: Path
    sidecar: Path
    max_logit_diff: float
    agreement: float
    text_weights: Path | None = None


def verification_images(imgsz: int, count: int = 3) -> np.ndarray:
    """[count,imgsz,imgsz,3] uint8 scenes with structure (synthetic, deterministic), not noise."""
    from PIL import Image

    from segcli.datasets.synthetic import synthetic_scene
    from segcli.inputs.geometry import fit_to_canvas

    scenes = [synthetic_scene(1234, "verify", i, size=(imgsz * 3 // 4, imgsz))[0] for i in range(count)]
    return np.stack([fit_to_canvas(Image.fromarray(s), imgsz).pixels for s in scenes])


def artifact_path(model_value: str, fmt: str) -> Path:
    """Where `segcli export` writes when no --output is given: the model's name with the format's
    suffix, in the current folder (`model.safetensors` -> model.onnx, `clip-dense:ViT-B-16` ->
    clip-dense_ViT-B-16.onnx)."""
    stem = Path(model_value).stem if Path(model_value).suffix else model_value.replace(":", "_").replace("@", "_")
    return Path(f"{stem}.{fmt}")


def export_model(model: PixelTextModel, output: str | Path, fmt: str = "onnx", labels: LabelSet | None = None,
                 imgsz: int | None = None, half: bool = False, prompt: str | None = None,
                 source: str = "") -> ExportReport:
    """Export, verify against PyTorch, then write the artifact and its sidecar (atomically)."""
    if fmt not in FORMATS:
        raise SegcliError(f"unknown --format {fmt!r}: use {' or '.join(FORMATS)}")
    output = Path(output)
    caps = model.capabilities
    if not caps.exportable:
        if caps.limits == "an ONNX export":
            raise SegcliError(f"{source or model.architecture} is already an export; export from the checkpoint")
        raise SegcliError(f"{source or model.architecture} does not export: {caps.limits}")
    imgsz = check_input_size(imgsz or model.default_imgsz, model.input_multiple)
    model = model.float().eval().cpu()
    text = model.label_embeddings(labels, prompt or model.default_prompt) if labels is not None else None
    dtype = torch.float16 if half else torch.float32
    pixels = verification_images(imgsz)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    probe_text = text if text is not None else _probe_embeddings(model)
    with torch.no_grad():
        reference, _ = model.dense_logits(images, probe_text)  # fp32 PyTorch: the ground truth
    graph = (BakedLabelsGraph(model, text) if text is not None else OpenVocabularyGraph(model)).eval()
    if half:
        graph = copy.deepcopy(graph).half()  # the caller's model (and the saved text tower) stay fp32
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".segcli-export-") as tmp:
        staged = Path(tmp) / output.name
        # batch 2 and K 2 as examples (size-1 dims would be specialised); verified at batch 3 and K 8
        example = (images[:2].to(dtype),) if text is not None else (images[:2].to(dtype), probe_text[:2].to(dtype))
        if fmt == "onnx":
            _export_onnx(graph, example, staged, open_vocab=text is None)
            produced = _run_onnx(staged, images.to(dtype).numpy(), None if text is not None else probe_text.to(dtype).numpy())
        else:
            _export_pt2(graph, example, staged, open_vocab=text is None)
            produced = _run_pt2(staged, images.to(dtype), None if text is not None else probe_text.to(dtype))
        produced = torch.from_numpy(np.asarray(produced, dtype=np.float32))
        diff = float((produced - reference).abs().max())
        agreement = float((produced.argmax(1) == reference.argmax(1)).float().mean())
        needed = MIN_AGREEMENT[half]
        if agreement < needed:
            raise SegcliError(f"export verification failed: the {fmt} model agrees with PyTorch on {agreement:.4%} "
                              f"of pixels (needs {needed:.1%}; max logit difference {diff:.4g}); nothing written")
        sidecar = _sidecar(model, fmt, imgsz, half, labels, prompt, text is None, diff, agreement, source)
        text_path = None
        if text is None:
            text_path = output.with_suffix(".text.safetensors")
            _save_text_tower(model, text_path)
            sidecar["text_weights"] = text_path.name
        os.replace(staged, output)
    sidecar_path = output.with_suffix(".json")
    atomic_write_json(sidecar_path, sidecar)
    return ExportReport(output, sidecar_path, diff, agreement, text_path)


def _probe_embeddings(model: PixelTextModel) -> torch.Tensor:
    """Label embeddings for verifying an open-vocabulary export: a few ordinary words."""
    words = LabelSet.from_synonyms([[w] for w in ("grass", "sky", "sand", "water", "ball", "box", "leaf", "person")])
    return model.label_embeddings(words, model.default_prompt)


def _export_onnx(graph: nn.Module, example: tuple, path: Path, open_vocab: bool) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise SegcliError("ONNX export needs onnx and onnxscript: pip install 'segcli[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    if open_vocab:
        labels = torch.export.Dim("labels", min=1, max=4096)
        names = (["images", "label_embeddings"], ["logits"])
        shapes = {"images": {0: batch}, "label_embeddings": {0: labels}}
    else:
        names = (["images"], ["logits", "label_map"])
        shapes = {"images": {0: batch}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, dynamo=True, input_names=names[0], output_names=names[1],
                                    dynamic_shapes=shapes, opset_version=ONNX_OPSET, verbose=False)
    program.save(str(path), external_data=False)


def _run_onnx(path: Path, images: np.ndarray, label_embeddings: np.ndarray | None) -> np.ndarray:
    session = onnx_session(path)
    feeds = {"images": images}
    if label_embeddings is not None:
        feeds["label_embeddings"] = label_embeddings
    return session.run(["logits"], feeds)[0]


def _export_pt2(graph: nn.Module, example: tuple, path: Path, open_vocab: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = ({"images": {0: batch}, "label_embeddings": {0: torch.export.Dim("labels", min=1, max=4096)}}
              if open_vocab else {"images": {0: batch}})
    with torch.no_grad():
        program = torch.export.export(graph, example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))


def _run_pt2(path: Path, images: torch.Tensor, label_embeddings: torch.Tensor | None) -> np.ndarray:
    program = torch.export.load(str(path))
    with torch.no_grad():
        out = program.module()(images, label_embeddings) if label_embeddings is not None else program.module()(images)
    return (out if torch.is_tensor(out) else out[0]).float().numpy()


def _save_text_tower(model: PixelTextModel, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.text_encoder.tower.state_dict().items()}
    text_cfg = dataclasses.asdict(model.cfg.text)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"format": TEXT_TOWER_FORMAT, "text_config": json.dumps(text_cfg),
                                        "default_prompt": json.dumps(model.default_prompt)})


def _sidecar(model: PixelTextModel, fmt: str, imgsz: int, half: bool, labels: LabelSet | None, prompt: str | None,
             open_vocab: bool, diff: float, agreement: float, source: str) -> dict:
    stride = model.output_stride
    grid = imgsz // stride
    return {
        "format": EXPORT_FORMAT,
        "segcli_version": __version__,
        "artifact": fmt,
        "source_model": source,
        "family": model.capabilities.family,
        "architecture": model.architecture,
        "mode": "open-vocabulary" if open_vocab else "labels-baked-in",
        "dtype": "float16" if half else "float32",  # of the images input and the weights
        "logits_dtype": "float32",  # the scoring runs in fp32 even in fp16 graphs
        "input": {"name": "images", "shape": ["batch", 3, imgsz, imgsz], "range": [0.0, 1.0],
                  "layout": "RGB, resized so the long side is imgsz (aspect kept), padded bottom/right with 0"},
        "imgsz": imgsz,
        "normalization": {"mean": list(model.cfg.pixel_mean), "std": list(model.cfg.pixel_std), "inside_graph": True},
        "outputs": ({"logits": ["batch", "K", grid, grid]} if open_vocab else
                    {"logits": ["batch", "K", grid, grid], "label_map": ["batch", grid, grid]}),
        "output_stride": stride,
        "output_meaning": "logits = logit_scale x cosine(pixel embedding, label embedding); the label of a pixel is "
                          "the argmax over K; upsample logits bilinearly to the image to get a full-size map",
        "logit_scale": model.logit_scale,
        "label_embeddings": ({"name": "label_embeddings", "shape": ["K", model.cfg.embed_dim],
                              "note": "L2-normalised; make them with segcli embed-labels"} if open_vocab else None),
        "labels": labels.to_json() if labels is not None else None,
        "prompt": prompt or model.default_prompt,
        "verification": {"max_logit_diff": diff, "argmax_agreement": agreement,
                         "required_agreement": MIN_AGREEMENT[half]},
    }


def write_label_embeddings(model, labels: LabelSet, output: str | Path, prompt: str | None = None,
                           source: str = "") -> tuple[Path, tuple[int, int]]:
    """FILE.npy (float32 [K,C], L2-normalised) + FILE.json (labels, model, prompt) for an
    open-vocabulary export, written atomically. `model` is any open-vocabulary DenseBackend."""
    if not model.open_vocabulary:
        raise SegcliError(f"{source or model.architecture} has its labels baked in: it has no text space to embed new labels")
    emb = model.label_embeddings(labels, prompt or model.default_prompt).float().cpu().numpy()
    output = Path(output).with_suffix(".npy")
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    atomic_write_json(output.with_suffix(".json"), {"labels": labels.to_json(), "model": source,
                                                    "prompt": prompt or model.default_prompt,
                                                    "shape": list(emb.shape)})
    return output, emb.shape
