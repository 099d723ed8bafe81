"""The training-free default (clip-dense): dense forward, local weights files, hub download and offline."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from safetensors.torch import save_file

from segcli.errors import SegcliError
from segcli.models.clip_weights import clip_dense_from_clip_state, parse_clip_dense_spec

ROOT = Path(__file__).resolve().parents[1]


def tiny_clip() -> CLIP:
    """An OpenAI-style (QuickGELU) CLIP ViT with random weights: 2 blocks of width 64, 4x4 patch grid."""
    torch.manual_seed(3)
    return CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(image_size=64, patch_size=16, width=64, layers=2, head_width=64),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
                quick_gelu=True).eval()


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict[str, Path]:
    """The same tiny CLIP in open_clip's two file formats."""
    folder = tmp_path_factory.mktemp("clip")
    state = {k: v.contiguous() for k, v in tiny_clip().state_dict().items()}
    files = {"safetensors": folder / "open_clip_model.safetensors", "bin": folder / "open_clip_pytorch_model.bin"}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["bin"])
    return files


@pytest.fixture
def small_photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("cat", "rocket"):
        Image.open(ROOT / "sample_images" / f"{name}.jpg").reduce(8).save(folder / f"{name}.jpg")
    return folder


def reference_dense(clip: CLIP, images: torch.Tensor) -> torch.Tensor:
    """ClearCLIP read of open_clip's own modules, at the stored grid: [B,C,h,w]."""
    v = clip.visual
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = v._embeds((images - mean) / std)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    last = v.transformer.resblocks[-1]
    y = last.ln_1(x)
    qkv = y @ last.attn.in_proj_weight.T + last.attn.in_proj_bias
    q, _, val = qkv.chunk(3, dim=-1)  # one head of width 64
    weights = torch.softmax(q @ q.transpose(1, 2) / 8.0, dim=-1)
    x = last.attn.out_proj(weights @ val)
    tokens = v.ln_post(x[:, 1:]) @ v.proj
    b, n, c = tokens.shape
    side = int(n ** 0.5)
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def test_dense_forward_matches_reference_and_text_matches_open_clip():
    clip = tiny_clip()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny", method="clearclip")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.pixel_embeddings(images)
        ref = reference_dense(clip, images)
        text = model.text_encoder(["a photo of a cat.", "sky"])
        ref_text = clip.encode_text(open_clip.tokenize(["a photo of a cat.", "sky"]), normalize=True)
    assert ours.shape == (2, 32, 4, 4)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text, ref_text, atol=1e-6, rtol=1e-5)
    # other input sizes resize the position embedding: the grid follows the input
    with torch.no_grad():
        wide = model.pixel_embeddings(torch.rand(1, 3, 96, 160))
    assert wide.shape == (1, 32, 6, 10) and torch.isfinite(wide).all()
    assert model.output_stride == 16 and not any(p.requires_grad for p in model.visual.parameters())


def reference_naclip(clip: CLIP, images: torch.Tensor, std: float) -> torch.Tensor:
    """NACLIP from its equations on open_clip's own modules, the Gaussian term written out cell by
    cell: the last block is softmax(k k^T / sqrt(d) + G) v, no residual, no feed-forward; [B,C,h,w]."""
    import math

    v = clip.visual
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    p = clip.visual.patch_size[0]
    h, w = images.shape[-2] // p, images.shape[-1] // p
    x = v.conv1((images - mean) / sd).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    g = int((v.positional_embedding.shape[0] - 1) ** 0.5)
    grid = v.positional_embedding[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    x = v.ln_pre(x + torch.cat([v.positional_embedding[:1], grid.flatten(2)[0].T]))
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    last = v.transformer.resblocks[-1]
    qkv = last.ln_1(x) @ last.attn.in_proj_weight.T + last.attn.in_proj_bias
    _, k, val = qkv.chunk(3, dim=-1)  # one head of width 64
    n = x.shape[1]
    bias = torch.zeros(n, n)
    for a in range(1, n):
        for b in range(1, n):
            (i, j), (r, c) = divmod(a - 1, w), divmod(b - 1, w)
            bias[a, b] = math.exp(-((i - r) ** 2 + (j - c) ** 2) / (2 * std ** 2))
    x = last.attn.out_proj(torch.softmax(k @ k.transpose(1, 2) / 8.0 + bias, dim=-1) @ val)
    tokens = v.ln_post(x[:, 1:]) @ v.proj
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


@pytest.mark.parametrize("std", [5.0, 1.0])
def test_naclip_matches_its_equations(std):
    import dataclasses

    clip = tiny_clip()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny", method="naclip")
    model.cfg = dataclasses.replace(model.cfg, gaussian_std=std)
    model._bias_cache = {}
    for size in ((64, 64), (96, 160)):
        images = torch.rand(2, 3, *size)
        with torch.no_grad():
            ours, ref = model.pixel_embeddings(images), reference_naclip(clip, images, std)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # not ClearCLIP's reading
        clear = clip_dense_from_clip_state(clip.state_dict(), "tiny", method="clearclip").pixel_embeddings(images)
    assert (clear - ours).abs().max() > 1e-3


def test_method_names_pick_the_method(clip_files):
    from segcli.models.factory import describe_model, load_model, resolve_model

    path = clip_files["safetensors"]
    spec = resolve_model(f"naclip:{path}")
    assert spec.kind == "weights" and spec.metadata == {"method": "naclip"}
    loaded = load_model(spec, torch.device("cpu"))
    assert loaded.backend.cfg.method == "naclip" and loaded.fingerprint.startswith("naclip:")
    assert load_model(resolve_model(str(path)), torch.device("cpu")).backend.cfg.method == "naclip"  # the default
    assert describe_model(f"naclip:{path}")["method"].startswith("naclip: NACLIP")
    assert parse_clip_dense_spec("naclip:ViT-B-16@openai") == ("ViT-B-16", "openai")
    assert parse_clip_dense_spec("naclip") == ("ViT-B-16", "openai")
    from segcli.models.clip_weights import is_clip_dense_spec, split_method

    assert is_clip_dense_spec("naclip:ViT-L-14") and not is_clip_dense_spec(f"naclip:{path}")
    assert split_method("clip-dense:ViT-B-16")[0] == "naclip" and split_method("lseg_tiny") is None


def test_imagenet80_ensemble_is_clips_zero_shot_classifier():
    """--prompt imagenet80 builds label embeddings as open_clip's own zero-shot classifier does, from
    open_clip's copy of the 80 OpenAI templates (so the template list is theirs too)."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from segcli.vocabulary.labels import parse_labels

    clip = tiny_clip()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny")
    with torch.no_grad():
        ours = model.label_embeddings(parse_labels("cat,sky,road"), "imagenet80")
        theirs = build_zero_shot_classifier(clip, open_clip.tokenize, ["cat", "sky", "road"], OPENAI_IMAGENET_TEMPLATES)
    torch.testing.assert_close(ours, theirs.T, atol=1e-5, rtol=1e-4)
    with pytest.raises(SegcliError, match="prompt set"):
        model.label_embeddings(parse_labels("cat"), "no braces here")


def test_weights_that_are_not_clip_are_refused(clip_files, tmp_path):
    state = tiny_clip().state_dict()
    del state["visual.proj"]
    with pytest.raises(SegcliError, match="visual.proj"):
        clip_dense_from_clip_state(state, "broken")
    assert parse_clip_dense_spec("clip-dense") == ("ViT-B-16", "openai")
    assert parse_clip_dense_spec("clip-dense:ViT-L-14@laion2b_s32b_b82k") == ("ViT-L-14", "laion2b_s32b_b82k")


def test_predict_with_local_clip_weights_files(clip_files, small_photos, tmp_path):
    from typer.testing import CliRunner

    from segcli.cli import app

    masks = {}
    for kind, path in clip_files.items():
        out = tmp_path / kind
        result = CliRunner().invoke(app, ["predict", str(small_photos), "--labels", "cat,sky", "--model", str(path),
                                          "-o", str(out), "--save", "mask", "-q"])
        assert result.exit_code == 0, result.output
        masks[kind] = {p.name: np.array(Image.open(p)) for p in sorted(out.glob("*_mask.png"))}
        assert sorted(masks[kind]) == ["cat_mask.png", "rocket_mask.png"]
        for name, mask in masks[kind].items():
            photo = Image.open(small_photos / name.replace("_mask.png", ".jpg"))
            assert mask.shape == (photo.height, photo.width) and set(np.unique(mask)) <= {0, 1}
    for name in masks["bin"]:
        assert np.array_equal(masks["bin"][name], masks["safetensors"][name])


def _segcli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env}, cwd=ROOT)


def test_default_model_offline_exits_2_with_one_line(small_photos, tmp_path):
    out = tmp_path / "out"
    result = _segcli(["predict", str(small_photos), "--labels", "cat,sky", "-o", str(out)],
                     {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot download the CLIP ViT-B-16 weights (openai)")
    assert "--model /path/to/open_clip_model.safetensors" in lines[0]
    assert not out.exists()


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves one file under any repo, the way the Hugging Face hub answers HEAD and GET."""

    payload = b""
    requests: list[str] = []

    def _answer(self) -> bool:
        self.requests.append(f"{self.command} {self.path}")
        if not self.path.endswith("/resolve/main/open_clip_model.safetensors"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.send_header("ETag", '"%s"' % hashlib.sha256(self.payload).hexdigest())
        self.send_header("X-Repo-Commit", "0" * 40)
        self.end_headers()
        return True

    def do_HEAD(self):
        self._answer()

    def do_GET(self):
        if self._answer():
            self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


def test_default_model_downloads_once_then_works_offline(clip_files, small_photos, tmp_path):
    _FakeHub.payload = clip_files["safetensors"].read_bytes()
    _FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hf_home = str(tmp_path / "hf")
    try:
        online = _segcli(["predict", str(small_photos), "--labels", "cat,sky", "-o", str(tmp_path / "a"), "--save", "mask"],
                         {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
    assert online.returncode == 0, online.stderr
    assert "GET /timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors" in _FakeHub.requests
    cached = list(Path(hf_home).rglob("open_clip_model.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == _FakeHub.payload
    offline = _segcli(["predict", str(small_photos), "--labels", "cat,sky", "-o", str(tmp_path / "b"), "--save", "mask"],
                      {"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    for name in ("cat_mask.png", "rocket_mask.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_info_describes_clip_models_without_downloading(clip_files):
    import json

    from typer.testing import CliRunner

    from segcli.cli import app

    spec = json.loads(CliRunner().invoke(app, ["info", "clip-dense", "--json"]).output)
    assert spec["architecture"] == "ViT-B-16" and spec["weights"].endswith("timm/vit_base_patch16_clip_224.openai")
    local = json.loads(CliRunner().invoke(app, ["info", str(clip_files["bin"]), "--json"]).output)
    assert local["kind"].startswith("CLIPDense") and local["config"]["width"] == 64 and local["config"]["layers"] == 2
    assert local["parameters"] == sum(v.numel() for k, v in tiny_clip().state_dict().items() if k != "logit_scale")


def test_clip_dense_saves_as_a_segcli_checkpoint_and_loads_back(clip_files, small_photos, tmp_path):
    from typer.testing import CliRunner

    from segcli.cli import app
    from segcli.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
    from segcli.vocabulary.labels import parse_labels

    model = clip_dense_from_clip_state(dict(tiny_clip().state_dict()), "tiny-clip")
    path = save_checkpoint(model, tmp_path / "clip.safetensors", labels=parse_labels("cat,sky"))
    info = read_checkpoint_info(path)
    assert info.family == "clip-dense" and info.config == model.cfg and info.labels.names == ("cat", "sky")
    loaded, _ = load_checkpoint(path)
    assert type(loaded).__name__ == "CLIPDense"
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    text = model.label_embeddings(parse_labels("cat,grass,sky"), model.default_prompt)
    with torch.no_grad():
        torch.testing.assert_close(loaded.dense_logits(images, text)[0], model.dense_logits(images, text)[0], atol=0, rtol=0)

    # `segcli convert` turns open_clip weights into the same checkpoint; predicting with either is identical
    converted = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(app, ["convert", str(clip_files["bin"]), str(converted)])
    assert result.exit_code == 0, result.output
    assert "family clip-dense" in result.stderr and read_checkpoint_info(converted).family == "clip-dense"
    masks = {}
    for name, model_arg in (("file", clip_files["bin"]), ("checkpoint", converted)):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["predict", str(small_photos), "-m", str(model_arg), "-l", "cat,sky",
                                          "-o", str(out), "--save", "mask", "--imgsz", "64", "-q"])
        assert result.exit_code == 0, result.output
        masks[name] = {p.name: p.read_bytes() for p in out.glob("*_mask.png")}
    assert len(masks["file"]) == 2 and masks["file"] == masks["checkpoint"]


def test_unreachable_hub_fails_fast_with_one_whole_line(small_photos, tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    started = time.monotonic()
    result = _segcli(["predict", str(small_photos), "--labels", "cat,sky", "-o", str(out)],
                     {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    seconds = time.monotonic() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot download the CLIP ViT-B-16 weights (openai) from the Hugging Face hub")
    assert "refused" in lines[0].lower() and f"127.0.0.1:{port}" in lines[0]
    assert lines[0].endswith("--model /path/to/open_clip_model.safetensors")  # whole, not cut
    assert seconds < 20, seconds  # start-up included; huggingface_hub's retries alone took ~50 s
    assert not out.exists()
