"""The model core: feature shapes for every architecture, LSeg key mapping, frozen text tower."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segcli.modeling import LSeg, build_model
from segcli.modeling.configs import ARCHITECTURES, get_config
from segcli.models.lseg_format import UNUSED_LSEG_KEYS, lseg_to_segcli_key
from segcli.vocabulary.labels import parse_labels

SHARED_LSEG = Path(__file__).resolve().parents[2] / "shared" / "lseg"


def _level_shapes(model: LSeg, images: torch.Tensor) -> list[tuple[int, ...]]:
    x = (images - model.pixel_mean) / model.pixel_std
    inter = model.image_encoder(x)
    return [tuple(re(t, c).shape) for (t, c), re in zip(inter, model.decoder.reassemble)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("hw", [(384, 384), (256, 448)])
def test_feature_shapes(arch, hw):
    cfg = get_config(arch)
    h, w = hw if arch != "lseg_tiny" else (hw[0] // 3 // 32 * 32, hw[1] // 3 // 32 * 32)
    device = "cpu" if arch == "lseg_tiny" else "meta"  # the big ones: shapes only, no memory
    with torch.device(device):
        model = LSeg(cfg).eval()
        images = torch.rand(2, 3, h, w)
    levels = _level_shapes(model, images)
    for level, (shape, ch, stride) in enumerate(zip(levels, cfg.reassemble_channels, (4, 8, 16, 32))):
        assert shape == (2, ch, h // stride, w // stride), f"level {level}"
    emb = model.pixel_embeddings(images)
    assert tuple(emb.shape) == (2, cfg.embed_dim, h // 2, w // 2)
    labels = torch.nn.functional.normalize(torch.rand(5, cfg.embed_dim, device=device), dim=-1)
    assert tuple(model(images, labels).shape) == (2, 5, h, w)


def test_input_size_must_be_multiple_of_32():
    model = build_model("lseg_tiny")
    with pytest.raises(ValueError, match="multiple of 32"):
        model.pixel_embeddings(torch.rand(1, 3, 100, 128))


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    rows = csv.reader((SHARED_LSEG / name).read_text().splitlines(), delimiter="\t")
    return {key: tuple(int(s) for s in shape.split(",")) if shape else () for key, shape in rows}


@pytest.mark.parametrize("arch,tsv", [("lseg_vitl16_384", "lseg_vitl16_384_state_dict.tsv"),
                                      ("lseg_vitb32_384", "lseg_vitb32_384_state_dict.tsv")])
def test_lseg_checkpoint_keys_map_one_to_one(arch, tsv):
    if not SHARED_LSEG.exists():
        pytest.skip("../shared/lseg not present")
    lseg = _tsv(tsv)
    assert len(lseg) == (730 if "vitl16" in arch else 586)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in LSeg(get_config(arch)).state_dict().items()}
    mapped = {}
    for key, shape in lseg.items():
        target = lseg_to_segcli_key(key)
        if target is None:
            assert any(key.startswith(p) for p in UNUSED_LSEG_KEYS), key
            continue
        assert target not in mapped, f"two LSeg keys map to {target}"
        mapped[target] = shape
    assert set(mapped) == set(ours), (sorted(set(mapped) - set(ours))[:5], sorted(set(ours) - set(mapped))[:5])
    mismatched = [k for k in ours if ours[k] != mapped[k]]
    assert not mismatched, [(k, ours[k], mapped[k]) for k in mismatched[:5]]


def test_pos_embed_unchanged_at_stored_grid_and_bilinear_elsewhere():
    model = build_model("lseg_tiny")
    vit = model.image_encoder.vit
    grid = torch.zeros(1, 8, 8, vit.embed_dim)
    tokens = vit._pos_embed(grid)
    expected = torch.cat([vit.cls_token, torch.zeros(1, 64, vit.embed_dim)], 1) + vit.pos_embed
    torch.testing.assert_close(tokens, expected)
    tokens = vit._pos_embed(torch.zeros(1, 4, 6, vit.embed_dim))
    g = vit.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(g, size=(4, 6), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 24, -1)
    torch.testing.assert_close(tokens[:, 1:], ref)


def test_text_tower_is_frozen_for_real():
    model = build_model("lseg_tiny")
    model.train()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not model.text_encoder.training and not model.text_encoder.tower.training
    assert model.decoder.training
    emb = model.label_embeddings(parse_labels("a,b"))
    assert not emb.requires_grad


def test_label_embeddings_cached_per_label_set_and_prompt(monkeypatch):
    model = build_model("lseg_tiny")
    calls = []
    real = model.text_encoder.forward
    monkeypatch.setattr(model.text_encoder, "forward", lambda texts: calls.append(list(texts)) or real(texts))
    labels = parse_labels("road;street,car")
    first = model.label_embeddings(labels)
    second = model.label_embeddings(parse_labels("road;street,car"))
    assert second is first and len(calls) == 1
    assert calls[0] == ["road", "street", "car"]
    model.label_embeddings(labels, prompt="a photo of a {}.")
    assert calls[1] == ["a photo of a road.", "a photo of a street.", "a photo of a car."]
    # synonyms are averaged after normalisation, then renormalised
    parts = real(["road", "street"])
    torch.testing.assert_close(first[0], F.normalize(parts.mean(0), dim=-1))
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))


def test_logits_are_scaled_cosines():
    model = build_model("lseg_tiny")
    emb = torch.randn(1, 64, 5, 7)
    labels = F.normalize(torch.randn(3, 64), dim=-1)
    logits = model.logits(emb, labels)
    assert logits.abs().max() <= 1 / 0.07 + 1e-4
    direct = (F.normalize(emb[0, :, 2, 3], dim=0) @ labels.T) / 0.07
    torch.testing.assert_close(logits[0, :, 2, 3], direct)
