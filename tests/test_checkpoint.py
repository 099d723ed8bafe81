from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from segcli.api import Segmenter
from segcli.cli import app
from segcli.errors import SegcliError
from segcli.modeling import build_model
from segcli.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from segcli.vocabulary.labels import parse_labels


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    model = build_model("lseg_tiny")
    labels = parse_labels("road;street,car,sky")
    path = save_checkpoint(model, tmp_path / "m.safetensors", labels=labels, extra={"epoch": 7})
    loaded, info = load_checkpoint(path)
    assert info.labels == labels and info.config == model.cfg
    assert json.loads(info.metadata["epoch"]) == 7
    images = torch.rand(2, 3, 64, 96)
    text_a, text_b = model.label_embeddings(labels), loaded.label_embeddings(labels)
    torch.testing.assert_close(text_a, text_b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(images, text_a), loaded(images, text_b), rtol=0, atol=0)
    assert not [n for n, t in loaded.state_dict().items() if t.is_meta]
    assert not [p for p in loaded.text_encoder.parameters() if p.requires_grad]


def test_checkpoint_writes_are_atomic(tmp_path):
    save_checkpoint(build_model("lseg_tiny"), tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(SegcliError, match="not found"):
        read_checkpoint_info(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(SegcliError, match="not a valid safetensors"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(SegcliError, match="not a segcli checkpoint"):
        load_checkpoint(foreign)
    good = save_checkpoint(build_model("lseg_tiny"), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SegcliError):
        load_checkpoint(truncated)
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(b"whatever")
    with pytest.raises(SegcliError, match="is not a PyTorch checkpoint or safetensors file"):
        Segmenter.from_pretrained(str(pkl), device="cpu")
    pkl.write_bytes(b"PK\x03\x04 a broken zip")
    with pytest.raises(SegcliError, match="not a readable PyTorch checkpoint"):
        Segmenter.from_pretrained(str(pkl), device="cpu")


def test_info_shows_architecture_labels_and_parameters(tiny_checkpoint):
    result = CliRunner().invoke(app, ["info", str(tiny_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == "lseg_tiny"
    assert data["labels"] == ["cat", "grass", "sky", "person"]
    assert data["parameters"] == sum(t.numel() for t in build_model("lseg_tiny").state_dict().values())
    assert data["metadata"]["segcli_version"]
    table = CliRunner().invoke(app, ["info", str(tiny_checkpoint)])
    assert table.exit_code == 0 and "lseg_tiny" in table.stdout and "grass" in table.stdout
    arch = CliRunner().invoke(app, ["info", "lseg_vitl16_384", "--json"])
    assert arch.exit_code == 0 and json.loads(arch.stdout)["parameters"] > 300_000_000
    missing = CliRunner().invoke(app, ["info", "nope.safetensors"])
    assert missing.exit_code == 2 and "not found" in missing.stderr
