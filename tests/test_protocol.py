"""The training-free methods' protocol (segcli.inference.windows): short-side resize, sliding windows, averages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_clip_dense import tiny_clip
from typer.testing import CliRunner

from segcli.api import Segmenter
from segcli.cli import app
from segcli.errors import SegcliError
from segcli.inference.settings import InferenceSettings
from segcli.inputs.geometry import Protocol, draft_size, model_pixels, resolve_protocol, short_side_size, windows
from segcli.modeling.configs import CLIP_DENSE_METHODS
from segcli.models.clip_weights import clip_dense_from_clip_state
from segcli.vocabulary.labels import parse_labels


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    """A tiny random CLIP read densely (patch 16), fp32 on the CPU."""
    return Segmenter(clip_dense_from_clip_state(tiny_clip().state_dict(), "tiny"), device="cpu", precision="fp32", imgsz=64)


def random_pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_one_window_that_covers_the_image_is_the_whole_image_result(seg):
    """A 64-pixel image in one 64-pixel window: its logits upsampled to its pixels, nothing more."""
    text = seg.label_embeddings(parse_labels("cat,sky,road"))
    pixels = random_pixels(64, 64)
    [windowed] = seg.runner.segment_images([pixels], text, protocol=Protocol(None, 64, 32))
    whole, _ = seg.runner.segment_canvases(pixels[None], text)
    assert windowed.shape == (3, 64, 64)
    assert torch.equal(windowed, F.interpolate(whole, size=(64, 64), mode="bilinear", align_corners=False)[0])
    [smaller] = seg.runner.segment_images([pixels[:40, :56]], text, protocol=Protocol(None, 64, 32))
    assert smaller.shape == (3, 40, 56)  # padded to the window, cut back to the image


def test_overlapping_windows_are_the_per_pixel_mean_of_the_window_logits(seg):
    """80x120 pixels, 64-pixel windows every 32, placed as mmseg's slide inference places them (the
    last one flush with the edge): rows at 0 and 16, columns at 0, 32 and 56; each window's logits
    upsampled to its pixels, each pixel the mean over the windows covering it."""
    text = seg.label_embeddings(parse_labels("cat,sky,road,tree"))
    pixels = random_pixels(80, 120, seed=1)
    corners = [(0, 0), (0, 32), (0, 56), (16, 0), (16, 32), (16, 56)]
    assert windows((80, 120), 64, 32) == corners
    assert windows((30, 20), 64, 32) == [(0, 0)] and windows((336, 504), 224, 112) == [
        (y, x) for y in (0, 112) for x in (0, 112, 224, 280)]
    per_window = {}
    for top, left in corners:
        logits, _ = seg.runner.segment_canvases(np.ascontiguousarray(pixels[top:top + 64, left:left + 64])[None], text)
        per_window[top, left] = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)[0].numpy()
    expected = np.zeros((4, 80, 120))
    for y in range(80):  # directly, pixel by pixel
        for x in range(120):
            covering = [v[:, y - t, x - left] for (t, left), v in per_window.items() if t <= y < t + 64 and left <= x < left + 64]
            expected[:, y, x] = np.mean(covering, axis=0)
    for batch_size in (1, 4, 8):
        [got] = seg.runner.segment_images([pixels], text, batch_size=batch_size, protocol=Protocol(None, 64, 32))
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    two = seg.runner.segment_images([pixels, random_pixels(30, 20)], text, batch_size=4, protocol=Protocol(None, 64, 32))
    np.testing.assert_allclose(two[0].numpy(), expected, rtol=1e-5, atol=1e-5)  # windows of two images share batches
    assert two[1].shape == (4, 30, 20)


def test_short_side_resize_follows_mmsegs_keep_ratio_rescale():
    assert short_side_size(640, 480, 448) == (597, 448)
    assert short_side_size(480, 640, 448) == (448, 597)
    assert short_side_size(300, 200, 336) == (504, 336)  # small photos grow
    assert short_side_size(4000, 500, 448) == (2048, 256)  # the long side stops at 2048
    image = Image.fromarray(random_pixels(480, 640))
    pixels, hw = model_pixels(image, 448, Protocol(448, 448, 224))
    assert pixels.shape == (448, 597, 3) and hw == (448, 597)
    pixels, hw = model_pixels(image, 320, Protocol())  # one canvas: long side 320, padded
    assert pixels.shape == (320, 320, 3) and hw == (240, 320)
    assert draft_size(4000, 3000, 448, Protocol(336, 224, 112)) == 448 and draft_size(4000, 3000, 448, Protocol()) == 448
    assert draft_size(4000, 3000, 320, Protocol(448, 448, 224)) == 597


def test_protocol_options_over_the_models_default():
    naclip = CLIP_DENSE_METHODS["naclip"].protocol
    assert resolve_protocol(naclip, None, None, None, 16) == naclip == Protocol(336, 224, 112)
    assert resolve_protocol(naclip, 448, None, None, 16) == Protocol(448, 224, 112)
    assert resolve_protocol(naclip, None, 448, None, 16) == Protocol(336, 448, 224)  # a new window: half of it
    assert resolve_protocol(naclip, None, 0, None, 16) == Protocol()
    assert resolve_protocol(None, None, 96, 47, 32) == Protocol(None, 96, 47)  # LSeg: 32-pixel inputs, any stride
    assert resolve_protocol(None, None, None, None, 32) == Protocol()
    for args, message in [((naclip, 448, 0, None, 16), "--window 0"), ((None, 448, None, None, 32), "give --window"),
                          ((naclip, None, 224, 240, 16), "at most the window"), ((naclip, None, 230, None, 16), "multiple of 16"),
                          ((naclip, None, None, 0, 16), "--stride 0: give a positive"),
                          ((naclip, 0, None, None, 16), "--short-side 0: give a positive"),
                          ((naclip, None, -224, None, 16), "--window -224 is too small")]:
        with pytest.raises(SegcliError, match=message):
            resolve_protocol(*args)


def test_predict_and_eval_run_the_methods_protocol(tmp_path):
    """The CLI's masks equal the Python API's under the model's protocol; the run records it; stored
    embeddings need one canvas; eval reports the protocol, the prompt and the refinement it ran."""
    from safetensors.torch import save_file

    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(weights))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(random_pixels(60, 90, seed=2)).save(photos / "a.png")
    Image.fromarray(random_pixels(120, 50, seed=3)).save(photos / "b.png")
    for method, row in CLIP_DENSE_METHODS.items():
        protocol = row.protocol
        if row.proxy:  # reads a second model beside CLIP's file: tests/test_proxyclip.py
            continue
        out = tmp_path / method
        result = CliRunner().invoke(app, ["predict", str(photos), "-l", "cat,sky,road", "-m", f"{method}:{weights}",
                                          "-o", str(out), "--save", "mask", "--precision", "fp32", "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / ".segcli" / "run.json").read_text())["protocol"] == {
            "short_side": protocol.short_side, "window": protocol.window, "stride": protocol.stride}
        api = Segmenter.from_pretrained(f"{method}:{weights}", device="cpu", precision="fp32")
        assert api.protocol == protocol
        for name in ("a", "b"):
            [pred] = api.predict([str(photos / f"{name}.png")], labels="cat,sky,road")
            assert np.array_equal(np.array(Image.open(out / f"{name}_mask.png")), pred.label_map)
    refused = CliRunner().invoke(app, ["predict", str(photos), "-l", "cat", "-m", str(weights), "-o", str(tmp_path / "e"),
                                       "--save", "embeddings", "-q"])
    assert refused.exit_code == 2 and "--window 0" in refused.stderr
    canvas = CliRunner().invoke(app, ["predict", str(photos), "-l", "cat,sky", "-m", str(weights), "-o", str(tmp_path / "c"),
                                      "--save", "mask,embeddings", "--window", "0", "-q"])
    assert canvas.exit_code == 0, canvas.output
    assert "protocol" not in json.loads((tmp_path / "c" / ".segcli" / "run.json").read_text())
    report = CliRunner().invoke(app, ["eval", "-m", f"naclip:{weights}", "--data", "synthetic", "--prompt", "a photo of a {}.",
                                      "--short-side", "96", "--json", "--device", "cpu"])
    assert report.exit_code == 0, report.output
    metrics = json.loads(report.stdout)
    assert (metrics["short_side"], metrics["window"], metrics["stride"]) == (96, 224, 112)
    assert metrics["refine"] == "pamr" and metrics["prompt"] == "a photo of a {}."


def test_synonym_max_is_the_label_of_the_best_synonym(seg, tmp_path):
    """Each synonym scored on its own, the label keeps its best: the map equals the per-synonym argmax
    map with synonyms folded onto their labels (API, predict's workers and the device path alike);
    "mean" scores one averaged embedding per label instead."""
    photo = Image.fromarray(random_pixels(70, 100, seed=4))
    grouped = parse_labels("cat;kitty,sky;heaven;air,road")
    flat = parse_labels("cat,kitty,sky,heaven,air,road")
    fold = np.array([0, 0, 1, 1, 1, 2], np.uint8)
    assert seg.synonyms == "max" and seg.label_groups(grouped).tolist() == fold.tolist()
    assert seg.label_embeddings(grouped).shape[0] == 6
    [best] = seg.predict([photo], labels=grouped)
    [each] = seg.predict([photo], labels=flat)
    assert np.array_equal(best.label_map, fold[each.label_map])
    assert len(np.unique(each.label_map)) > 2  # the random model spreads its votes: the fold is tested
    seg.configure(InferenceSettings(synonyms="mean"))
    try:
        assert seg.label_groups(grouped) is None and seg.label_embeddings(grouped).shape[0] == 3
    finally:
        seg.configure(InferenceSettings())


def test_synonym_max_through_predict_host_and_device_paths(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(weights))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(random_pixels(90, 70, seed=5)).save(photos / "p.png")
    labels = "cat;kitty,sky;heaven;air,road"
    api = Segmenter.from_pretrained(str(weights), device="cpu", precision="fp32")
    [want] = api.predict([str(photos / "p.png")], labels=labels)
    for where in ("host", "device"):
        out = tmp_path / where
        result = CliRunner().invoke(app, ["predict", str(photos), "-l", labels, "-m", str(weights), "-o", str(out),
                                          "--precision", "fp32", "--postprocess", where, "-q"])
        assert result.exit_code == 0, result.output
        assert np.array_equal(np.array(Image.open(out / "p_mask.png")), want.label_map)
        assert json.loads((out / ".segcli" / "run.json").read_text())["synonyms"] == "max"


def test_background_threshold_gives_label_0_where_no_label_is_sure(seg):
    text = seg.label_embeddings(parse_labels("background,cat,sky,road"))
    [logits] = seg.runner.segment_images([random_pixels(64, 64, seed=6)], text, protocol=Protocol())
    probs = (logits * seg.model.capabilities.probability_scale).softmax(0).amax(0)
    assert seg.model.capabilities.probability_scale == 40.0 / 100.0  # cosine x NACLIP's 40, not CLIP's 100
    threshold = float(probs.median())  # half the cells are unsure
    seg.configure(InferenceSettings(bg_threshold=threshold))
    try:
        out = seg.runner.threshold_background(logits)
    finally:
        seg.configure(InferenceSettings())
    unsure = probs < threshold
    assert 0 < int(unsure.sum()) < unsure.numel()
    assert (out.argmax(0)[unsure] == 0).all()
    assert torch.equal(out.argmax(0)[~unsure], logits.argmax(0)[~unsure])  # the sure cells keep their label
    assert torch.equal(out[1:], logits[1:])
    with pytest.raises(SegcliError, match="between 0 and 1"):
        seg.configure(InferenceSettings(bg_threshold=1.5))
