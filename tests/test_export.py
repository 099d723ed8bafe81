"""segcli export (ONNX both modes, pt2, fp16), embed-labels, and predict through onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES, TINY_LABELS
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import SegcliError

pytest.importorskip("onnxruntime")


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export")
    paths = {"baked": folder / "baked.onnx", "open": folder / "open.onnx"}
    result = cli("export", "--model", str(tiny_checkpoint), "--labels", TINY_LABELS, "-o", str(paths["baked"]))
    assert result.exit_code == 0, result.output
    result = cli("export", "--model", str(tiny_checkpoint), "-o", str(paths["open"]))
    assert result.exit_code == 0, result.output
    return paths


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.glob("*_mask.png"))}


def test_sidecars_describe_the_graphs(exports):
    baked = json.loads(exports["baked"].with_suffix(".json").read_text())
    open_vocab = json.loads(exports["open"].with_suffix(".json").read_text())
    assert baked["mode"] == "labels-baked-in" and [x["label"] for x in baked["labels"]] == TINY_LABELS.split(",")
    assert baked["outputs"] == {"logits": ["batch", "K", 64, 64], "label_map": ["batch", 64, 64]}
    assert open_vocab["mode"] == "open-vocabulary" and open_vocab["labels"] is None
    assert open_vocab["label_embeddings"]["shape"] == ["K", 64]
    assert exports["open"].with_suffix(".text.safetensors").is_file()
    for meta in (baked, open_vocab):
        assert meta["imgsz"] == 128 and meta["input"]["shape"] == ["batch", 3, 128, 128]
        assert meta["verification"]["argmax_agreement"] >= 0.999
        assert meta["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "inside_graph": True}


def test_onnxruntime_matches_pytorch_with_dynamic_batch_and_labels(exports, tiny_checkpoint):
    import onnxruntime as ort

    from segcli.api import Segmenter
    from segcli.vocabulary.labels import parse_labels

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    canvases = np.stack([seg.runner.prepare(Image.open(p).convert("RGB")).pixels for p in sorted(SAMPLES.glob("*.jpg"))])
    images = canvases.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    for labels in (TINY_LABELS, "tree,car,road,building,water,mountain,dog"):
        text = seg.label_embeddings(parse_labels(labels))
        reference, _ = seg.runner.segment_canvases(canvases, text)
        session = ort.InferenceSession(str(exports["open"]), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"images": images, "label_embeddings": text.numpy()})
        assert logits.shape == (4, len(text), 64, 64)
        assert (logits.argmax(1) == reference.numpy().argmax(1)).mean() >= 0.999
        np.testing.assert_allclose(logits, reference.numpy(), atol=1e-3)
    session = ort.InferenceSession(str(exports["baked"]), providers=["CPUExecutionProvider"])
    logits, label_map = session.run(["logits", "label_map"], {"images": images[:3]})
    reference, _ = seg.runner.segment_canvases(canvases[:3], seg.label_embeddings(parse_labels(TINY_LABELS)))
    assert logits.shape == (3, 4, 64, 64) and (label_map == logits.argmax(1)).all()
    assert (label_map == reference.numpy().argmax(1)).mean() >= 0.999


@pytest.mark.parametrize("mode", ["baked", "open"])
def test_predict_through_onnxruntime_writes_the_same_masks(exports, tiny_checkpoint, samples, tmp_path, mode):
    ref, onnx = tmp_path / "torch", tmp_path / "onnx"
    common = [str(samples), "--labels", TINY_LABELS, "--save", "mask,color", "--precision", "fp32", "-q"]
    assert cli("predict", *common, "--model", str(tiny_checkpoint), "-o", str(ref)).exit_code == 0
    result = cli("predict", *common, "--model", str(exports[mode]), "-o", str(onnx))
    assert result.exit_code == 0, result.output
    a, b = _masks(ref), _masks(onnx)
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert (a[name] == b[name]).mean() >= 0.999, name
    assert (onnx / "labels.json").read_text() == (ref / "labels.json").read_text()


def test_baked_export_refuses_other_labels_and_sizes(exports, samples, tmp_path):
    other = cli("predict", str(samples), "--labels", "dog,car", "--model", str(exports["baked"]), "-o", str(tmp_path / "a"))
    assert other.exit_code == 2 and "baked in" in other.output
    size = cli("predict", str(samples), "--model", str(exports["baked"]), "--imgsz", "256", "-o", str(tmp_path / "b"))
    assert size.exit_code == 2 and "--imgsz 128 only" in size.output


def test_embed_labels_for_serving_without_pytorch(exports, tiny_checkpoint, tmp_path):
    from segcli.api import Segmenter
    from segcli.vocabulary.labels import parse_labels

    out = tmp_path / "labels.npy"
    result = cli("embed-labels", "--model", str(exports["open"]), "--labels", "sofa;couch,floor,wall", "-o", str(out))
    assert result.exit_code == 0, result.output
    emb = np.load(out)
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu")
    expected = seg.label_embeddings(parse_labels("sofa;couch,floor,wall")).numpy()
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert [x["label"] for x in json.loads(out.with_suffix(".json").read_text())["labels"]] == ["sofa", "floor", "wall"]


def test_pt2_and_half_exports_are_verified(tiny_checkpoint, tmp_path):
    pt2 = tmp_path / "tiny.pt2"
    result = cli("export", "--model", str(tiny_checkpoint), "--format", "pt2", "--labels", TINY_LABELS, "-o", str(pt2))
    assert result.exit_code == 0, result.output
    program = torch.export.load(str(pt2))
    logits, label_map = program.module()(torch.rand(2, 3, 128, 128))
    assert logits.shape == (2, 4, 64, 64) and label_map.shape == (2, 64, 64)
    half = tmp_path / "half.onnx"
    result = cli("export", "--model", str(tiny_checkpoint), "--half", "-o", str(half))
    assert result.exit_code == 0, result.output
    meta = json.loads(half.with_suffix(".json").read_text())
    assert meta["dtype"] == "float16" and meta["verification"]["argmax_agreement"] >= 0.99
    from safetensors.torch import load_file

    text = load_file(str(half.with_suffix(".text.safetensors")))  # only the image graph is fp16
    assert all(v.dtype == torch.float32 for v in text.values() if v.is_floating_point())


def test_failed_verification_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import segcli.models.export as export

    monkeypatch.setattr(export, "_run_onnx", lambda path, images, text: -np.ones((3, 4, 64, 64), np.float32))
    from segcli.models.checkpoint import load_checkpoint
    from segcli.vocabulary.labels import parse_labels

    model, _ = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "bad.onnx"
    with pytest.raises(SegcliError, match="verification failed"):
        export.export_model(model, out, "onnx", parse_labels(TINY_LABELS))
    assert list(tmp_path.iterdir()) == []


def test_info_reads_the_sidecar(exports):
    result = cli("info", str(exports["baked"]), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "ONNX export (labels-baked-in)" and data["imgsz"] == 128

