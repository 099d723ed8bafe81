"""Stored pixel embeddings: the file, relabel (byte for byte predict's outputs), search, the API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES, TINY_LABELS, small_photos
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file
from typer.testing import CliRunner

from segcli.cli import app

OTHER_LABELS = "sky;heaven,grass,person,cat,tree"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def outputs_of(folder: Path, suffixes=("_mask.png", "_color.png", "_overlay.jpg")) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.name.endswith(suffixes)}


@pytest.fixture
def photos(tmp_path) -> Path:
    return small_photos(tmp_path / "photos", {"cat": "cat", "coffee": "sub/coffee", "rocket": "rocket"}, 200)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> Path:
    from test_clip_dense import tiny_clip

    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("family", ["lseg", "clip-dense"])
@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_relabel_gives_predicts_bytes(photos, tmp_path, tiny_checkpoint, clip_file, family, dtype):
    """Stored at the model's own stride in the dtype it computed (auto: bf16 where the CPU has it,
    else stored fp16 of fp32 values; float32 always exact), relabel with new labels writes the very
    bytes predict writes for those labels."""
    model = str(tiny_checkpoint if family == "lseg" else clip_file)
    stored = tmp_path / "stored"
    result = cli("predict", str(photos), "-l", TINY_LABELS, "-m", model, "-o", str(stored), "--save",
                 "mask,embeddings", "--embed-dtype", dtype, "--window", "0", "--refine", "none", "-q")  # one canvas, as stored
    assert result.exit_code == 0, result.output
    reference = tmp_path / "reference"
    assert cli("predict", str(photos), "-l", OTHER_LABELS, "-m", model, "-o", str(reference), "--window", "0", "--refine",
               "none", "-q").exit_code == 0
    relabeled = tmp_path / "relabeled"
    result = cli("relabel", str(stored), "-l", OTHER_LABELS, "-o", str(relabeled), "-q")
    assert result.exit_code == 0, result.output
    with safe_open(str(stored / "cat_embed.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["segcli"])
        stored_dtype = f.get_tensor("embeddings").dtype
    exact = dtype == "float32" or info["compute_dtype"] != "float32"
    assert (stored_dtype == torch.float32) == (dtype == "float32")
    ours, theirs = outputs_of(relabeled), outputs_of(reference)
    assert sorted(ours) == sorted(theirs) == sorted(f"{n}{s}" for n in ("cat", "rocket", "sub/coffee")
                                                    for s in ("_mask.png", "_color.png", "_overlay.jpg"))
    if exact:
        assert ours == theirs
    else:  # fp32 values rounded to fp16 in the file: nearly every pixel
        for name in ours:
            if name.endswith("_mask.png"):
                a, b = (np.array(Image.open(d / name)) for d in (relabeled, reference))
                assert (a == b).mean() > 0.99
    summary = json.loads((relabeled / "summary.json").read_text())
    assert summary["counts"]["ok"] == 3 and summary["labels"] == ["sky", "grass", "person", "cat", "tree"]
    again = cli("relabel", str(stored), "-l", OTHER_LABELS, "-o", str(relabeled))
    assert again.exit_code == 0 and "3 ok, 0 failed, 3 already done" in again.output


def test_the_stored_file(photos, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = cli("predict", str(photos), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(out), "--save",
                 "embeddings", "--embed-dtype", "float32", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.rglob("*.safetensors")) == ["cat_embed.safetensors", "coffee_embed.safetensors",
                                                                  "rocket_embed.safetensors"]
    path = out / "cat_embed.safetensors"
    with safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["segcli"])
    emb = load_file(str(path))["embeddings"]  # readable with safetensors + NumPy alone
    photo = Image.open(photos / "cat.jpg")
    assert info["full_hw"] == [photo.height, photo.width] and info["stride"] == 2 and info["normalised"] is False
    assert info["model_fingerprint"].startswith("sha256-partial:") and info["family"] == "lseg"
    assert info["photo"]["path"] == str((photos / "cat.jpg").resolve()) and info["photo"]["size"] == (photos / "cat.jpg").stat().st_size
    rh, rw = info["resized_hw"]
    assert max(rh, rw) == info["imgsz"] and emb.shape == (info["channels"], -(-rh // 2), -(-rw // 2))
    from segcli.api import Segmenter

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu")
    from segcli.inputs.geometry import fit_to_canvas
    from segcli.inputs.images import decode_photo

    canvas = fit_to_canvas(decode_photo(photos / "cat.jpg", draft_long_side=seg.imgsz).image, seg.imgsz)
    _, full = seg.runner.segment_canvases(canvas.pixels[None], seg.label_embeddings(seg.resolve_labels(TINY_LABELS)),
                                   return_embeddings=True)
    # the photo's cells as the model computed them: bit for bit in predict's own batch; recomputed
    # alone, oneDNN may round differently (its kernels depend on the batch and the ISA), by rounding
    # steps of the dtype the model computed in, carried through its layers
    again = full[0, :, :emb.shape[1], :emb.shape[2]].numpy()
    diff = np.abs(emb - again) / np.abs(again).max()
    print("stored vs recomputed alone: max", diff.max(), "mean", diff.mean(), "equal", (diff == 0).mean())
    assert diff.max() <= (2.0 ** -5 if seg.autocast_dtype == torch.bfloat16 else 1e-4) and diff.mean() <= 1e-3


def test_pooled_embeddings_are_an_average_pooling(photos, tmp_path, tiny_checkpoint):
    runs = {}
    for stride in (2, 8):
        runs[stride] = tmp_path / f"s{stride}"
        result = cli("predict", str(photos), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(runs[stride]),
                     "--save", "embeddings", "--embed-dtype", "float32", "--embed-stride", str(stride), "-q")
        assert result.exit_code == 0, result.output
    for name in ("cat", "rocket", "sub/coffee"):
        fine = load_file(str(runs[2] / f"{name}_embed.safetensors"))["embeddings"].astype(np.float64)
        coarse = load_file(str(runs[8] / f"{name}_embed.safetensors"))["embeddings"]
        unit = fine / np.linalg.norm(fine, axis=0, keepdims=True)
        c, h, w = unit.shape
        expected = np.zeros((c, -(-h // 4), -(-w // 4)))
        for i in range(expected.shape[1]):
            for j in range(expected.shape[2]):
                expected[:, i, j] = unit[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(c, -1).mean(1)
        expected /= np.linalg.norm(expected, axis=0, keepdims=True)
        assert coarse.shape == expected.shape and np.abs(coarse - expected).max() < 1e-5
        with safe_open(str(runs[8] / f"{name}_embed.safetensors"), "np") as f:
            info = json.loads(f.metadata()["segcli"])
        assert info["stride"] == 8 and info["normalised"] is True
    bad = cli("predict", str(photos), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(tmp_path / "bad"),
              "--save", "embeddings", "--embed-stride", "5")
    assert bad.exit_code == 2 and "multiple of this model's output stride (2)" in bad.output
    # relabel works from pooled embeddings too (a coarser map)
    result = cli("relabel", str(runs[8]), "-l", OTHER_LABELS, "-o", str(tmp_path / "r8"), "--save", "mask", "-q")
    assert result.exit_code == 0, result.output
    mask = np.array(Image.open(tmp_path / "r8" / "cat_mask.png"))
    assert mask.shape == np.array(Image.open(photos / "cat.jpg")).shape[:2] and mask.max() < 5


def test_relabel_refuses_another_models_embeddings(photos, tmp_path, tiny_checkpoint):
    from segcli.modeling import build_model
    from segcli.models.checkpoint import save_checkpoint
    from segcli.vocabulary.labels import parse_labels

    torch.manual_seed(7)
    other = tmp_path / "other.safetensors"
    save_checkpoint(build_model("lseg_tiny"), other, labels=parse_labels(TINY_LABELS))
    stored = tmp_path / "stored"
    assert cli("predict", str(photos), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(stored),
               "--save", "embeddings", "-q").exit_code == 0
    result = cli("relabel", str(stored), "-l", OTHER_LABELS, "-m", str(other), "-o", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "was made by another model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists() or not outputs_of(tmp_path / "r")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("relabel", str(empty), "-l", OTHER_LABELS)
    assert result.exit_code == 2 and "holds no stored embeddings" in result.output


def test_a_moved_photo_skips_only_its_overlay(photos, tmp_path, tiny_checkpoint):
    stored = tmp_path / "stored"
    assert cli("predict", str(photos), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(stored),
               "--save", "embeddings", "-q").exit_code == 0
    shutil.move(photos / "rocket.jpg", tmp_path / "rocket.jpg")
    out = tmp_path / "out"
    result = cli("relabel", str(stored), "-l", OTHER_LABELS, "-o", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert f"warning: {stored / 'rocket_embed.safetensors'}: no overlay: the file went away" in result.output
    assert (out / "rocket_mask.png").exists() and (out / "rocket_color.png").exists()
    assert not (out / "rocket_overlay.jpg").exists() and (out / "cat_overlay.jpg").exists()
    rocket = next(r for r in json.loads((out / "summary.json").read_text())["images"] if r["output"] == "rocket")
    assert rocket["status"] == "ok" and rocket["warning"].startswith("no overlay")


def test_segmenter_embed_query_equals_predict(tiny_checkpoint):
    from segcli import embeddings
    from segcli.api import Segmenter

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu")
    paths = [SAMPLES / "cat.jpg", SAMPLES / "rocket.jpg"]
    for emb, pred in zip(seg.embed(paths), seg.predict(paths, OTHER_LABELS)):
        assert np.array_equal(emb.query(OTHER_LABELS), pred.label_map)
    with pytest.raises(Exception, match="no model attached"):
        embeddings.PixelEmbeddings(emb.embeddings, emb.info).query("a,b")
