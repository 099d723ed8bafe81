"""catseg: CAT-Seg's blocks against their equations, its protocol, and its weights (converted from the
authors' detectron2 layout, never unpickling objects), on tiny random-weight models; no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLES
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import SegcliError
from segcli.modeling.catseg import CATSeg
from segcli.modeling.configs import CATSEG_PROTOCOL, CATSegConfig, TextConfig
from segcli.modeling.cost_aggregation import Aggregator, LinearAttention, SwinTransformerBlock
from segcli.models.catseg_weights import authors_layout

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> CATSegConfig:
    """CAT-Seg's layout at a fraction of the width: a 12-block CLIP of width 64 (guidance from blocks
    3 and 7, as ViT-B/16), a 2-layer aggregator of width 32, the authors' 24 x 24 grid and window 12."""
    base = dict(name="catseg:tiny", patch_size=16, width=64, layers=12, heads=1, clip_resolution=384, pos_embed_grid=14,
                guidance_layers=(3, 7), text=TextConfig(width=64, heads=1, layers=2, embed_dim=32), guidance_proj_dim=16,
                decoder_dims=(32, 16), decoder_guidance_dims=(16, 8), decoder_guidance_proj_dims=(8, 4), num_layers=2,
                num_heads=4, hidden_dim=32, window_size=12)
    return CATSegConfig(**{**base, **changes})


def tiny_catseg(seed: int = 0, **changes) -> CATSeg:
    torch.manual_seed(seed)
    model = CATSeg(tiny_config(**changes)).eval()
    with torch.no_grad():  # the learned padding is zero at init: make it count
        for name, p in model.named_parameters():
            if "padding" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory) -> tuple[Path, CATSeg]:
    """A tiny CAT-Seg saved as the authors' release is: torch.save of detectron2's {"model": ..., "iteration": N}."""
    model = tiny_catseg(1)
    path = tmp_path_factory.mktemp("catseg") / "model_tiny.pth"
    torch.save({"model": authors_layout(model), "iteration": 80000}, path)
    return path, model


def test_linear_attention_is_its_equation():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 6)
    phi = lambda t: F.elu(t) + 1  # noqa: E731
    expected = torch.zeros(2, 5, 3, 6)
    for n in range(2):
        for h in range(3):
            for i in range(5):
                weights = torch.stack([phi(q[n, i, h]) @ phi(k[n, j, h]) for j in range(7)])
                expected[n, i, h] = (weights[:, None] * v[n, :, h]).sum(0) / (weights.sum() + 1e-6)
    torch.testing.assert_close(LinearAttention()(q, k, v), expected, rtol=1e-4, atol=1e-5)


def test_shifted_windows_attend_only_within_their_region():
    """Swin's cyclic shift wraps the grid's edges into shared windows; the mask keeps tokens from
    different original regions apart (-100), the rest attend freely."""
    block = SwinTransformerBlock(8, 0, (8, 8), num_heads=2, window=4, shift=2)
    mask = block.attn_mask  # [4 windows, 16, 16]
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    last = mask[-1]  # the bottom-right window gathers four regions: 4 x 4 tokens each in 2 x 2 blocks
    assert (last == 0).sum() == 4 * 4 * 4
    unshifted = SwinTransformerBlock(8, 0, (8, 8), num_heads=2, window=4, shift=0)
    assert unshifted.attn_mask is None


def test_more_classes_than_the_pad_length_keep_the_top_ones():
    """With more classes than `pad_len`, the classes whose cost peaks highest are aggregated as if
    they were the only ones; the others score -100, as in the authors' Aggregator."""
    torch.manual_seed(2)
    agg = Aggregator(text_guidance_dim=16, text_guidance_proj_dim=8, appearance_guidance_dim=16,
                     appearance_guidance_proj_dim=8, decoder_dims=(16, 16), decoder_guidance_dims=(8, 8),
                     decoder_guidance_proj_dims=(4, 4), num_layers=1, nheads=2, hidden_dim=16,
                     feature_resolution=(8, 8), window_size=4, pad_len=4).eval()
    img, text = torch.randn(1, 16, 8, 8), F.normalize(torch.randn(1, 7, 1, 16), dim=-1)
    guidance = [img, torch.randn(1, 8, 16, 16), torch.randn(1, 8, 32, 32)]
    with torch.no_grad():
        out = agg(img, text, guidance)
        corr = torch.einsum("bchw,btpc->bpthw", F.normalize(img, dim=1), text)
        top = corr.flatten(-2).amax(-1)[0, 0].topk(4).indices.sort().values
        alone = agg(img, text[:, top], guidance)
    assert out.shape == (1, 7, 32, 32)
    rest = [i for i in range(7) if i not in top.tolist()]
    assert (out[0, rest] == -100).all()
    torch.testing.assert_close(out[0, top], alone[0], rtol=1e-5, atol=1e-5)


def test_class_and_position_chunks_change_no_number():
    model = tiny_catseg(3)
    text = F.normalize(torch.randn(9, 32), dim=-1)
    images = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        whole, _ = model.dense_logits(images, text)
        model.class_chunk = 2
        for layer in model.aggregator.layers:
            layer.attention.row_chunk = 100  # 576 positions in 6 pieces
        chunked, _ = model.dense_logits(images, text)
    assert whole.shape == (1, 9, 384, 384) and 0 < whole.min() and whole.max() < 1  # sigmoid scores
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_the_protocol_is_square_windows_and_a_global_view():
    """CAT-Seg's inference_sliding_window: the short-side-640 image stretched (in float) to
    640 x 640, 384 windows every 256 (at 0 and 256), their mean, averaged half and half with the
    short-side image resized to 384."""
    from segcli.inference.segmenter import Segmenter
    from segcli.inputs.geometry import model_pixels

    model = tiny_catseg(4)
    seg = Segmenter(model, device="cpu", precision="fp32")
    assert seg.protocol == CATSEG_PROTOCOL and seg.protocol.describe().startswith("resized to 640 x 640")
    photo = Image.open(SAMPLES / "cat.jpg").convert("RGB")
    pixels, hw = model_pixels(photo, seg.imgsz, seg.protocol)
    assert pixels.shape == (640, 962, 3) and hw == (640, 640)  # detectron2's short-side 640 (451x300 -> 962x640)
    text = seg.label_embeddings(seg.resolve_labels("cat,grass,sky"))
    [scores] = seg.runner.segment_images([pixels], text)
    short = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(short, size=(640, 640), mode="bilinear", align_corners=False)
    with torch.no_grad():
        total, count = torch.zeros(3, 640, 640), torch.zeros(1, 640, 640)
        for y in (0, 256):
            for x in (0, 256):
                total[:, y:y + 384, x:x + 384] += model.dense_logits(image[..., y:y + 384, x:x + 384], text)[0][0]
                count[:, y:y + 384, x:x + 384] += 1
        whole = model.dense_logits(F.interpolate(short, size=(384, 384), mode="bilinear", align_corners=False), text)[0]
        expected = (total / count + F.interpolate(whole, size=(640, 640), mode="bilinear", align_corners=False)[0]) / 2
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_the_authors_checkpoint_converts_key_for_key(authors_checkpoint):
    from segcli.models.catseg_weights import catseg_from_state
    from segcli.models.weights import read_state_dict

    path, model = authors_checkpoint
    converted = catseg_from_state(read_state_dict(path), "catseg:model_tiny.pth")
    assert converted.cfg == tiny_config(name="catseg:model_tiny.pth")  # the architecture, read off the shapes
    for key, value in model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    broken = read_state_dict(path)
    broken["sem_seg_head.predictor.transformer.conv1.weight"] = torch.zeros(32, 2, 7, 7)
    with pytest.raises(SegcliError, match="does not fit CAT-Seg"):
        catseg_from_state(broken, "broken.pth")
    with pytest.raises(SegcliError, match="not a CAT-Seg checkpoint"):
        catseg_from_state({"visual.proj": torch.zeros(2, 2)}, "clip.pth")


def _segcli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env}, cwd=ROOT)


def test_predict_and_info_with_a_local_catseg_checkpoint(authors_checkpoint, tmp_path):
    path, _ = authors_checkpoint
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(SAMPLES / "cat.jpg").reduce(2).save(photos / "cat.jpg")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["predict", str(photos), "-m", f"catseg:{path}", "-l", "cat,grass,sky", "-o", str(out),
                                   "--save", "mask", "--device", "cpu", "-q"])
    assert run.exit_code == 0, run.output
    mask = np.array(Image.open(out / "cat_mask.png"))
    assert mask.shape == Image.open(photos / "cat.jpg").size[::-1] and set(np.unique(mask)) <= {0, 1, 2}
    record = json.loads((out / "summary.json").read_text())
    assert record["settings"]["protocol"] == {"short_side": 640, "window": 384, "stride": 256, "square": True,
                                              "global_view": True}
    refused = CliRunner().invoke(app, ["predict", str(photos), "-m", f"catseg:{path}", "-l", "cat,sky", "-o",
                                       str(tmp_path / "emb"), "--save", "mask,embeddings", "--device", "cpu", "-q"])
    assert refused.exit_code == 2 and "cost-volume model" in refused.output
    info = CliRunner().invoke(app, ["info", f"catseg:{path}", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["family"] == "catseg"
    missing = CliRunner().invoke(app, ["info", f"catseg:{tmp_path / 'nope.pth'}"])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1 and "catseg:FILE" in missing.output


def test_the_release_is_described_without_a_download_and_offline_is_one_line(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    info = _segcli(["info", "catseg:B", "--json"], env)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["family"] == "catseg" and data["architecture"] == "catseg:B"
    assert "model_base.pth" in data["release file"] and data["release cached"].startswith("no")
    assert "hamacojr/CAT-Seg-weights" in data["weights"] and data["downloads"] == "on first use, then cached"
    photo = tmp_path / "cat.jpg"
    Image.open(SAMPLES / "cat.jpg").save(photo)
    ran = _segcli(["predict", str(photo), "-m", "catseg:L", "-l", "cat,sky", "-o", str(tmp_path / "out")], env)
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 2 and len(lines) == 1, ran.stderr
    assert "model_large.pth" in lines[0] and "--model catseg:/path/to/model_large.pth" in lines[0]


def test_a_release_is_converted_once_then_read_from_segcli_cache(authors_checkpoint, tmp_path, monkeypatch):
    from segcli.models import catseg_weights

    path, model = authors_checkpoint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(catseg_weights.CATSEG_VARIANTS, "B", tiny_config(name="catseg:B"))
    monkeypatch.setattr(catseg_weights, "download_release", lambda variant: path)
    first, source = catseg_weights.load_catseg("catseg:B")
    assert source == tmp_path / "cache" / "segcli" / "catseg" / "catseg_B.safetensors" and source.is_file()

    def no_download(variant):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(catseg_weights, "download_release", no_download)
    again, source_again = catseg_weights.load_catseg("catseg:B")
    assert source_again == source
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    text = F.normalize(torch.randn(3, 32), dim=-1)
    images = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(again.dense_logits(images, text)[0], model.dense_logits(images, text)[0])
