"""proxyclip: ProxyCLIP's last block (DINO ViT patch similarity as the attention over CLIP's values),
checked against its equations on tiny random models, end to end through predict, eval and relabel's
stored embeddings. (Beside the authors' own code, on the same weights, it agreed to 2.7e-7: see the
README.)"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from segcli.cli import app
from segcli.models.clip_weights import clip_dense_from_clip_state

ROOT = Path(__file__).resolve().parents[1]


def tiny_models():
    torch.manual_seed(5)
    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(image_size=64, patch_size=16, width=64, layers=2, head_width=64),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True).eval()
    from timm.models.vision_transformer import VisionTransformer

    dino = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=1, qkv_bias=True, num_classes=0,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    for p in dino.parameters():  # timm's init leaves the position embedding near zero: give it structure
        p.data += torch.randn_like(p) * 0.05
    return clip, dino


def test_proxy_block_is_its_equations():
    clip, dino = tiny_models()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny", method="proxyclip", proxy_state=dino.state_dict())
    assert model.output_stride == 8 and model.input_multiple == 16
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        got = model.pixel_embeddings(images)  # [2,32,8,12]
        # DINO at its trained size would be timm's own forward; here the grid is 8x12, so the position
        # embedding is resized as DINO's code does (scale factor (n + 0.1) / 8, bicubic)
        dn = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        tokens = dino.patch_embed.proj(dn).flatten(2).transpose(1, 2)
        pos = dino.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, scale_factor=(8.1 / 8, 12.1 / 8), mode="bicubic").flatten(2).transpose(1, 2)
        x = torch.cat([dino.cls_token.expand(2, -1, -1), tokens], 1) + torch.cat([dino.pos_embed[:, :1], pos], 1)
        for block in dino.blocks:
            x = block(x)
        feats = F.normalize(dino.norm(x)[:, 1:], dim=-1)  # [2,96,64]
        v = clip.visual
        y = v.conv1((images - torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1))
                    / torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1))
        y = torch.cat([v.class_embedding.expand(2, 1, -1), y.flatten(2).transpose(1, 2)], 1)
        y = v.ln_pre(y + model.position_embedding((4, 6)))
        y = v.transformer.resblocks[0](y)  # open_clip's own block (batch first)
        last = v.transformer.resblocks[1]
        values = F.linear(last.ln_1(y), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)[2][:, 1:]
        values = F.interpolate(values.transpose(1, 2).reshape(2, 64, 4, 6), size=(8, 12), mode="bilinear")
        values = values.flatten(2).transpose(1, 2)  # [2,96,64]
        expected = []
        for i in range(2):  # one image at a time, as the authors run it
            s = feats[i] @ feats[i].T
            s = (s - 1.2 * s.mean()) * 3.0
            a = torch.where(s < 0, torch.full_like(s, -torch.inf), s).softmax(-1)
            out = last.attn.out_proj(a @ values[i])
            expected.append((v.ln_post(out) @ v.proj).T.reshape(32, 8, 12))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_a_proxyclip_checkpoint_runs_predict_eval_and_stored_embeddings(tmp_path):
    from segcli.models.checkpoint import read_checkpoint_info, save_checkpoint
    from segcli.vocabulary.labels import parse_labels

    clip, dino = tiny_models()
    model = clip_dense_from_clip_state(clip.state_dict(), "tiny-proxy", method="proxyclip", proxy_state=dino.state_dict())
    path = save_checkpoint(model, tmp_path / "proxy.safetensors", labels=parse_labels("cat,sky,grass"))
    info = read_checkpoint_info(path)
    assert info.config.method == "proxyclip" and info.config.proxy.patch_size == 8
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.jpg", "rocket.jpg"):
        Image.open(ROOT / "sample_images" / name).resize((150, 110)).save(photos / name)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["predict", str(photos), "-m", str(path), "-o", str(out), "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    record = json.loads((out / "summary.json").read_text())
    assert record["counts"]["ok"] == 2 and record["settings"]["protocol"] == {"short_side": 448, "window": 336, "stride": 112}
    assert np.array(Image.open(out / "cat_mask.png")).shape == (110, 150)
    stored = tmp_path / "stored"
    run = CliRunner().invoke(app, ["predict", str(photos), "-m", str(path), "-o", str(stored), "-q", "--window", "0",
                                   "--save", "mask,embeddings", "--embed-dtype", "float32", "--imgsz", "96", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    relabel = CliRunner().invoke(app, ["relabel", str(stored), "-l", "cat,sky,grass", "-o", str(tmp_path / "re"), "-q",
                                       "--save", "mask", "--device", "cpu"])
    assert relabel.exit_code == 0, relabel.output
    for name in ("cat", "rocket"):  # the stored cells (stride 8) give predict's masks
        assert (tmp_path / "re" / f"{name}_mask.png").read_bytes() == (stored / f"{name}_mask.png").read_bytes()


def test_info_names_the_second_model_without_downloading():
    from segcli.models.factory import describe_model, resolve_model

    spec = resolve_model("proxyclip:ViT-B-16")
    assert spec.downloads and spec.metadata["method"] == "proxyclip"
    data = describe_model("proxyclip:ViT-B-16")
    assert data["method"].startswith("proxyclip: ProxyCLIP") and "vit_base_patch8_224.dino" in data["proxy weights"]
    assert data["protocol"].startswith("short side 448, 336-pixel windows every 112")


def test_proxyclip_needs_its_second_model():
    clip, _ = tiny_models()
    from segcli.errors import SegcliError

    with pytest.raises(SegcliError, match="needs the DINO ViT weights"):
        clip_dense_from_clip_state(clip.state_dict(), "tiny", method="proxyclip")


def test_local_files_for_both_models(tmp_path):
    from safetensors.torch import save_file

    clip, dino = tiny_models()
    clip_file, dino_file = tmp_path / "open_clip_model.safetensors", tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, str(dino_file))
    photo = tmp_path / "p.png"
    Image.open(ROOT / "sample_images" / "cat.jpg").resize((120, 90)).save(photo)
    run = CliRunner().invoke(app, ["predict", str(photo), "-m", f"proxyclip:{clip_file},{dino_file}", "-l", "cat,sky",
                                   "-o", str(tmp_path / "out"), "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert np.array(Image.open(tmp_path / "out" / "p_mask.png")).shape == (90, 120)
    offline = CliRunner().invoke(app, ["predict", str(photo), "-m", f"proxyclip:{clip_file}", "-l", "cat,sky",
                                       "-o", str(tmp_path / "out2"), "-q"])
    lines = offline.stderr.strip().splitlines()
    assert offline.exit_code == 2 and len(lines) == 1 and "proxyclip:/path/to/open_clip_model.safetensors,/path/to/" in lines[0]
