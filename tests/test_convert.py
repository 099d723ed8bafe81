"""LSeg .ckpt conversion: documented key layout -> segcli, checked against an independent forward pass
written from ../shared/lseg/LSEG_CHECKPOINT_FORMAT.md with plain tensor ops."""

from __future__ import annotations

import math
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import SegcliError
from segcli.modeling.text_encoder import TextEncoder
from segcli.models.checkpoint import load_checkpoint
from segcli.models.convert import convert_weights
from segcli.models.lseg_weights import infer_config, read_lseg_state_dict
from segcli.vocabulary.labels import parse_labels

# A small LSeg (ViT-B/16 layout, fewer and narrower layers): documented names, small shapes.
D, DEPTH, PATCH, GRID, CH, FEAT, W, TEXT_LAYERS, C = 128, 4, 16, 4, (16, 32, 64, 64), 32, 64, 2, 32


def lseg_state_dict() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    half = torch.float16

    def add(key, *shape, dtype=torch.float32):
        if key.endswith(("norm1.weight", "norm2.weight", "ln_1.weight", "ln_2.weight", "ln_final.weight", "bn1.weight", "bn2.weight")):
            t = 1 + 0.1 * torch.randn(*shape, generator=g)
        elif key.endswith("running_var"):
            t = 0.5 + torch.rand(*shape, generator=g)
        else:
            t = 0.05 * torch.randn(*shape, generator=g) if "embedding" not in key else 0.5 * torch.randn(*shape, generator=g)
        sd["net." + key] = t.to(dtype)

    add("clip_pretrained.positional_embedding", 77, W)
    add("clip_pretrained.text_projection", W, C, dtype=half)
    sd["net.clip_pretrained.logit_scale"] = torch.tensor(math.log(100.0))
    add("clip_pretrained.visual.class_embedding", 32)  # the unused image tower, abbreviated
    add("clip_pretrained.visual.proj", 32, C, dtype=half)
    for n in range(TEXT_LAYERS):
        p = f"clip_pretrained.transformer.resblocks.{n}."
        add(p + "attn.in_proj_weight", 3 * W, W, dtype=half)
        add(p + "attn.in_proj_bias", 3 * W, dtype=half)
        add(p + "attn.out_proj.weight", W, W, dtype=half)
        add(p + "attn.out_proj.bias", W, dtype=half)
        add(p + "ln_1.weight", W), add(p + "ln_1.bias", W)
        add(p + "mlp.c_fc.weight", 4 * W, W, dtype=half), add(p + "mlp.c_fc.bias", 4 * W, dtype=half)
        add(p + "mlp.c_proj.weight", W, 4 * W, dtype=half), add(p + "mlp.c_proj.bias", W, dtype=half)
        add(p + "ln_2.weight", W), add(p + "ln_2.bias", W)
    add("clip_pretrained.token_embedding.weight", 49408, W)
    add("clip_pretrained.ln_final.weight", W), add("clip_pretrained.ln_final.bias", W)
    v = "pretrained.model."
    add(v + "cls_token", 1, 1, D), add(v + "pos_embed", 1, 1 + GRID * GRID, D)
    add(v + "patch_embed.proj.weight", D, 3, PATCH, PATCH), add(v + "patch_embed.proj.bias", D)
    for n in range(DEPTH):
        b = f"{v}blocks.{n}."
        add(b + "norm1.weight", D), add(b + "norm1.bias", D)
        add(b + "attn.qkv.weight", 3 * D, D), add(b + "attn.qkv.bias", 3 * D)
        add(b + "attn.proj.weight", D, D), add(b + "attn.proj.bias", D)
        add(b + "norm2.weight", D), add(b + "norm2.bias", D)
        add(b + "mlp.fc1.weight", 4 * D, D), add(b + "mlp.fc1.bias", 4 * D)
        add(b + "mlp.fc2.weight", D, 4 * D), add(b + "mlp.fc2.bias", D)
    add(v + "norm.weight", D), add(v + "norm.bias", D), add(v + "head.weight", 1000, D), add(v + "head.bias", 1000)
    for level, ch in enumerate(CH, 1):
        a = f"pretrained.act_postprocess{level}."
        add(a + "0.project.0.weight", D, 2 * D), add(a + "0.project.0.bias", D)
        add(a + "3.weight", ch, D, 1, 1), add(a + "3.bias", ch)
        if level in (1, 2):  # ConvTranspose2d, stored [in, out, k, k], kernel = stride = 4, 2
            k = 4 // level
            add(a + "4.weight", ch, ch, k, k), add(a + "4.bias", ch)
        elif level == 4:  # Conv2d 3x3 stride 2
            add(a + "4.weight", ch, ch, 3, 3), add(a + "4.bias", ch)
    for level, ch in enumerate(CH, 1):
        add(f"scratch.layer{level}_rn.weight", FEAT, ch, 3, 3)
    for level in range(1, 5):
        r = f"scratch.refinenet{level}."
        add(r + "out_conv.weight", FEAT, FEAT, 1, 1), add(r + "out_conv.bias", FEAT)
        for unit in ("resConfUnit1.", "resConfUnit2."):
            for i in (1, 2):
                add(r + unit + f"conv{i}.weight", FEAT, FEAT, 3, 3)
                for stat in ("weight", "bias", "running_mean", "running_var"):
                    add(r + unit + f"bn{i}.{stat}", FEAT)
                sd["net." + r + unit + f"bn{i}.num_batches_tracked"] = torch.tensor(100)
    add("scratch.head1.weight", C, FEAT, 1, 1), add("scratch.head1.bias", C)
    return sd


def reference_logits(sd: dict, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """LSeg's forward as documented (fp32 everywhere, scale 1/0.07): images [B,3,H,W] in [0,1] -> [B,K,H,W]."""
    g = {k.removeprefix("net."): v.float() for k, v in sd.items()}
    x = (images - 0.5) / 0.5
    t = F.conv2d(x, g["pretrained.model.patch_embed.proj.weight"], g["pretrained.model.patch_embed.proj.bias"], stride=PATCH)
    B, _, gh, gw = t.shape
    t = torch.cat([g["pretrained.model.cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = g["pretrained.model.pos_embed"]
    grid = pos[:, 1:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, D)
    t = t + torch.cat([pos[:, :1], grid], 1)
    hooks = []
    for n in range(DEPTH):
        b = f"pretrained.model.blocks.{n}."
        h = F.layer_norm(t, (D,), g[b + "norm1.weight"], g[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, g[b + "attn.qkv.weight"], g[b + "attn.qkv.bias"]).reshape(B, -1, 3, D // 64, 64).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * 0.125).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(B, -1, D), g[b + "attn.proj.weight"], g[b + "attn.proj.bias"])
        h = F.layer_norm(t, (D,), g[b + "norm2.weight"], g[b + "norm2.bias"], eps=1e-6)
        hidden = F.gelu(F.linear(h, g[b + "mlp.fc1.weight"], g[b + "mlp.fc1.bias"]))
        t = t + F.linear(hidden, g[b + "mlp.fc2.weight"], g[b + "mlp.fc2.bias"])
        hooks.append(t)  # DEPTH 4: hooks at every block
    levels = []
    for level, t in enumerate(hooks, 1):
        a = f"pretrained.act_postprocess{level}."
        patches = t[:, 1:]
        r = F.gelu(F.linear(torch.cat([patches, t[:, :1].expand_as(patches)], -1), g[a + "0.project.0.weight"], g[a + "0.project.0.bias"]))
        r = F.conv2d(r.transpose(1, 2).reshape(B, D, gh, gw), g[a + "3.weight"], g[a + "3.bias"])
        if level in (1, 2):
            r = F.conv_transpose2d(r, g[a + "4.weight"], g[a + "4.bias"], stride=4 // level)
        elif level == 4:
            r = F.conv2d(r, g[a + "4.weight"], g[a + "4.bias"], stride=2, padding=1)
        levels.append(F.conv2d(r, g[f"scratch.layer{level}_rn.weight"], padding=1))

    def bn(y, p):
        return F.batch_norm(y, g[p + "running_mean"], g[p + "running_var"], g[p + "weight"], g[p + "bias"], False, 0.0, 1e-5)

    def rcu(y, p):
        o = bn(F.conv2d(F.relu(y), g[p + "conv1.weight"], padding=1), p + "bn1.")
        o = bn(F.conv2d(F.relu(o), g[p + "conv2.weight"], padding=1), p + "bn2.")
        return o + y

    def fuse(level, path, skip=None):
        r = f"scratch.refinenet{level}."
        if skip is not None:
            path = path + rcu(skip, r + "resConfUnit1.")
        o = F.interpolate(rcu(path, r + "resConfUnit2."), scale_factor=2, mode="bilinear", align_corners=True)
        return F.conv2d(o, g[r + "out_conv.weight"], g[r + "out_conv.bias"])

    p = fuse(4, levels[3])
    for level in (3, 2, 1):
        p = fuse(level, p, levels[level - 1])
    f = F.conv2d(p, g["scratch.head1.weight"], g["scratch.head1.bias"])

    tt = g["clip_pretrained.token_embedding.weight"][tokens] + g["clip_pretrained.positional_embedding"]
    L = tokens.shape[1]
    mask = torch.full((L, L), float("-inf")).triu(1)
    for n in range(TEXT_LAYERS):
        b = f"clip_pretrained.transformer.resblocks.{n}."
        h = F.layer_norm(tt, (W,), g[b + "ln_1.weight"], g[b + "ln_1.bias"], eps=1e-5)
        q, k, v = F.linear(h, g[b + "attn.in_proj_weight"], g[b + "attn.in_proj_bias"]).split(W, -1)
        q, k, v = (z.reshape(z.shape[0], L, W // 64, 64).transpose(1, 2) for z in (q, k, v))
        att = ((q * 0.125) @ k.transpose(-1, -2) + mask).softmax(-1) @ v
        tt = tt + F.linear(att.transpose(1, 2).reshape(-1, L, W), g[b + "attn.out_proj.weight"], g[b + "attn.out_proj.bias"])
        h = F.layer_norm(tt, (W,), g[b + "ln_2.weight"], g[b + "ln_2.bias"], eps=1e-5)
        m = F.linear(h, g[b + "mlp.c_fc.weight"], g[b + "mlp.c_fc.bias"])
        tt = tt + F.linear(m * torch.sigmoid(1.702 * m), g[b + "mlp.c_proj.weight"], g[b + "mlp.c_proj.bias"])
    tt = F.layer_norm(tt, (W,), g["clip_pretrained.ln_final.weight"], g["clip_pretrained.ln_final.bias"], eps=1e-5)
    text = tt[torch.arange(tt.shape[0]), tokens.argmax(-1)] @ g["clip_pretrained.text_projection"]

    img = F.normalize(f.permute(0, 2, 3, 1), dim=-1)
    logits = (img @ F.normalize(text, dim=-1).T / 0.07).permute(0, 3, 1, 2)
    return F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)


def save_lightning(path, state_dict, extra=None):
    """torch.save in PyTorch Lightning's layout, with its ModelCheckpoint class object as a dict key."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls
    sys.modules.update(mods)
    try:
        torch.save({
            "epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.4.9", "state_dict": state_dict,
            "callbacks": {cls: {"monitor": "val_acc_epoch", "best_model_score": torch.tensor(0.5),
                                "best_model_path": "x.ckpt", "current_score": None, "dirpath": "/ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.004, "momentum": 0.9}]}],
            "lr_schedulers": [{"base_lrs": [0.004], "last_epoch": 5, "lr_lambdas": [None]}],
            **(extra or {}),
        }, path)
    finally:
        for n in names:
            sys.modules.pop(n, None)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lseg") / "demo_small.ckpt"
    sd = lseg_state_dict()
    save_lightning(path, sd)
    return path, sd


def test_convert_matches_independent_forward(lightning_ckpt, tmp_path):
    src, sd = lightning_ckpt
    out, converted, _ = convert_weights(src, tmp_path / "small.safetensors")
    cfg = converted.cfg
    assert cfg.hook_blocks == (0, 1, 2, 3) and cfg.reassemble_channels == CH and cfg.embed_dim == C
    model, info = load_checkpoint(out)
    assert len(info.labels) == 150 and info.labels.source == "ade20k"
    labels = parse_labels("cat,grass;lawn,sky")
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    texts = ["cat", "grass", "sky"]
    tokens = TextEncoder.tokenize(model.text_encoder, texts)
    expected = reference_logits(sd, images, tokens)
    with torch.no_grad():
        ours = model(images, model.text_encoder(texts))
    assert ours.shape == expected.shape == (2, 3, 96, 128)
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)
    assert (ours.argmax(1) == expected.argmax(1)).float().mean() > 0.999
    assert model.label_embeddings(labels).shape == (3, C)


def test_bare_state_dict_without_prefix_also_converts(lightning_ckpt, tmp_path):
    _, sd = lightning_ckpt
    bare = tmp_path / "bare.pth"
    torch.save({k.removeprefix("net."): v for k, v in sd.items()}, bare)
    assert set(read_lseg_state_dict(bare)) == {k.removeprefix("net.") for k in sd}
    assert infer_config(read_lseg_state_dict(bare)).name == "lseg_custom"


def test_missing_or_misshapen_weights_are_refused(lightning_ckpt, tmp_path):
    _, sd = lightning_ckpt
    broken = OrderedDict(sd)
    del broken["net.scratch.refinenet2.out_conv.bias"]
    save_lightning(tmp_path / "missing.ckpt", broken)
    with pytest.raises(SegcliError, match="lacks 1 weights"):
        convert_weights(tmp_path / "missing.ckpt", tmp_path / "x.safetensors")
    broken = OrderedDict(sd)
    broken["net.scratch.head1.bias"] = torch.zeros(7)
    save_lightning(tmp_path / "shape.ckpt", broken)
    with pytest.raises(SegcliError, match="shape mismatch for decoder.head.bias"):
        convert_weights(tmp_path / "shape.ckpt", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_pickled_object_is_refused_and_never_runs(lightning_ckpt, tmp_path):
    _, sd = lightning_ckpt
    marker = tmp_path / "pwned"
    save_lightning(tmp_path / "evil.ckpt", sd, extra={"hyper_parameters": _Payload(marker)})
    with pytest.raises(SegcliError, match=r"refusing .*evil\.ckpt: it holds a pickled (posix|os)\.system") as info:
        read_lseg_state_dict(tmp_path / "evil.ckpt")
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "system" in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_cli_convert_then_predict(lightning_ckpt, tmp_path):
    src, _ = lightning_ckpt
    out = tmp_path / "small.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert "lseg_custom" in result.stderr
    from conftest import SAMPLES

    pred = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-m", str(out), "-l", "cat,sky",
                                    "-o", str(tmp_path / "o"), "--save", "mask", "--imgsz", "128", "-q"])
    assert pred.exit_code == 0, pred.output
    on_the_fly = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-m", str(src), "-l", "cat,sky",
                                          "-o", str(tmp_path / "o2"), "--save", "mask", "--imgsz", "128", "-q"])
    assert on_the_fly.exit_code == 0, on_the_fly.output
    masks = [next((tmp_path / d).rglob("cat_mask.png")).read_bytes() for d in ("o", "o2")]
    assert masks[0] == masks[1]
