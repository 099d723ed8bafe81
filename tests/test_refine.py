"""PAMR refinement (--refine): the maths against a direct loop, and its place in predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLES, TINY_LABELS
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.modeling.pamr import PAMR

_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def loop_pamr(image: np.ndarray, logits: np.ndarray, iterations: int, dilations: tuple[int, ...]) -> np.ndarray:
    """PAMR pixel by pixel from its definition: image [3,H,W], logits [K,H,W], edges replicated."""
    _, h, w = image.shape

    def at(a, y, x):
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    neighbours = [(d * dy, d * dx) for d in dilations for dy, dx in _OFFSETS]
    weights = np.zeros((h, w, len(neighbours)))
    for y in range(h):
        for x in range(w):
            window = [at(image, y + d * dy, x + d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            spread = np.std(window, axis=0, ddof=1)  # per channel, centres included
            scores = [np.mean(-np.abs(image[:, y, x] - at(image, y + oy, x + ox)) / (1e-8 + 0.1 * spread))
                      for oy, ox in neighbours]
            e = np.exp(np.array(scores) - max(scores))
            weights[y, x] = e / e.sum()
    out = logits.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(out)
        for y in range(h):
            for x in range(w):
                new[:, y, x] = sum(weights[y, x, i] * at(out, y + oy, x + ox) for i, (oy, ox) in enumerate(neighbours))
        out = new
    return out


def test_pamr_equals_a_direct_loop():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11)).astype(np.float32)
    logits = rng.normal(size=(5, 9, 11)).astype(np.float32)
    ours = PAMR(iterations=3, dilations=(1, 2), label_chunk=2)(torch.from_numpy(image)[None], torch.from_numpy(logits)[None])
    np.testing.assert_allclose(ours[0].numpy(), loop_pamr(image, logits, 3, (1, 2)), rtol=1e-4, atol=1e-5)
    # per-channel scale and shift of the image do not change the weights (|difference| / spread)
    scaled = PAMR(iterations=3, dilations=(1, 2))(torch.from_numpy(image * 7.0 + 3.0)[None], torch.from_numpy(logits)[None])
    torch.testing.assert_close(scaled, ours, rtol=1e-4, atol=1e-5)


def test_predict_refines_at_the_canvas_size(tmp_path, tiny_checkpoint, monkeypatch):
    """--refine pamr changes the masks; the refinement runs on the canvas-size logits of the photo
    (bounded memory), not at the photo's own size: a 24 MP photo costs what a small one does."""
    big = tmp_path / "big"
    big.mkdir()
    Image.open(SAMPLES / "rocket.jpg").convert("RGB").resize((6000, 4000)).save(big / "huge.jpg", quality=80)
    shapes = []
    real = PAMR.forward

    def spy(self, image, logits):
        shapes.append(tuple(logits.shape))
        return real(self, image, logits)

    monkeypatch.setattr(PAMR, "forward", spy)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(big), "-l", TINY_LABELS, "-m", str(tiny_checkpoint), "-o", str(out),
                                      "--save", "mask", "--refine", "pamr", "-q"])
    assert result.exit_code == 0, result.output
    assert shapes == [(1, 4, 85, 128)]  # K labels x the photo's size inside the 128 canvas
    assert np.array(Image.open(out / "huge_mask.png")).shape == (4000, 6000)
    assert json.loads((out / ".segcli" / "run.json").read_text())["refine"] == "pamr"


def test_refine_changes_masks_and_auto_follows_the_method(tmp_path, tiny_checkpoint):
    from safetensors.torch import save_file
    from test_clip_dense import tiny_clip

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat", "rocket"):
        Image.open(SAMPLES / f"{name}.jpg").save(photos / f"{name}.jpg")
    clip = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(clip))
    masks = {}
    for name, model, refine in (("naclip auto", str(clip), "auto"), ("naclip none", f"naclip:{clip}", "none"),
                                ("clearclip auto", f"clearclip:{clip}", "auto")):  # a plain file: naclip, the default
        out = tmp_path / name.replace(" ", "_")
        result = CliRunner().invoke(app, ["predict", str(photos), "-l", "cat,grass,sky", "-m", model, "-o", str(out),
                                          "--save", "mask", "--refine", refine, "--window", "0", "--imgsz", "64", "-q"])
        assert result.exit_code == 0, result.output
        masks[name] = np.array(Image.open(out / "cat_mask.png"))
        assert json.loads((out / ".segcli" / "run.json").read_text()).get("refine") == (
            "pamr" if name == "naclip auto" else None)
    assert (masks["naclip auto"] != masks["naclip none"]).any()  # PAMR moved some boundaries
    bad = CliRunner().invoke(app, ["predict", str(photos), "-l", "a,b", "-m", str(tiny_checkpoint), "--refine", "crf"])
    assert bad.exit_code == 2 and "--refine 'crf'" in bad.output


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_label_chunks_do_not_change_the_result(chunk):
    torch.manual_seed(0)
    image, logits = torch.randn(1, 3, 20, 30), torch.randn(1, 7, 20, 30)
    torch.testing.assert_close(PAMR(4, (1, 3), label_chunk=chunk)(image, logits), PAMR(4, (1, 3), label_chunk=7)(image, logits))
