from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES, NetworkAccess
from PIL import Image

from segcli import Segmenter
from segcli.errors import SegcliError
from segcli.inputs.images import to_rgb


def test_predict_accepts_paths_pil_and_arrays(tiny_checkpoint):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    cat = Image.open(SAMPLES / "cat.jpg")
    preds = seg.predict([SAMPLES / "coffee.jpg", cat, np.asarray(cat.convert("L"))], labels="a,b;c,d",
                        return_logits=True, return_embeddings=True)
    assert [p.label_map.shape for p in preds] == [(400, 600), (300, 451), (300, 451)]
    assert all(p.label_map.max() < 3 and p.labels.names == ("a", "b", "d") for p in preds)
    assert preds[0].logits.shape == (3, 43, 64) and preds[0].embeddings.shape == (64, 43, 64)
    assert preds[1].logits.abs().max() <= 1 / 0.07 + 1e-3  # scaled cosines
    # every label in the full-size map is best or second best somewhere at model resolution
    top2 = set(preds[1].logits.topk(2, dim=0).indices.unique().tolist())
    assert set(np.unique(preds[1].label_map).tolist()) <= top2
    # in-memory images go through the same conversion as files: transparent -> white, 16-bit scaled
    assert to_rgb(Image.new("RGBA", (4, 3), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    assert seg.predict(deep, labels="a,b")[0].label_map.shape == (3, 4)
    default = seg.predict(cat)  # the checkpoint's own labels
    assert default[0].labels.names == ("cat", "grass", "sky", "person")


def test_same_image_same_result_whatever_the_batch(tiny_checkpoint):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    images = [Image.open(SAMPLES / f"{n}.jpg") for n in ("cat", "rocket", "coffee")]
    one = [seg.predict(im, labels="x,y,z", return_logits=True)[0] for im in images]
    batch = seg.predict(images, labels="x,y,z", batch_size=3, return_logits=True)
    for a, b in zip(one, batch):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_untrained_architecture_warns_and_is_repeatable():
    with pytest.warns(UserWarning, match="untrained"):
        a = Segmenter.from_pretrained("lseg_tiny", device="cpu")
    b = Segmenter.from_pretrained("lseg_tiny", device="cpu", warn=False)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_device_and_precision_validation():
    with pytest.raises(SegcliError, match="unknown device"):
        Segmenter.from_pretrained("lseg_tiny", device="gpu0", warn=False)
    with pytest.raises(SegcliError, match="fp16 is not supported on the CPU"):
        Segmenter.from_pretrained("lseg_tiny", device="cpu", precision="fp16", warn=False)


def test_network_is_blocked_in_tests():
    with pytest.raises(NetworkAccess):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def test_int8_quantises_the_image_branch_only_and_predict_records_it(tiny_checkpoint, tmp_path):
    """--precision int8 (CPU): the image branch's linear layers become dynamic int8, the text tower
    stays fp32, masks stay close to fp32's, and the run folder records int8 (a re-run with another
    precision is another setting)."""
    import json

    import torch
    from typer.testing import CliRunner

    from segcli.cli import app

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="int8")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    linears = [m for m in seg.model.image_encoder.modules() if isinstance(m, (torch.nn.Linear, DynamicLinear))]
    assert linears and all(isinstance(m, DynamicLinear) for m in linears)
    assert not any(isinstance(m, DynamicLinear) for m in seg.model.text_encoder.modules())
    fp32 = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    photos = sorted((Path(__file__).resolve().parents[1] / "sample_images").glob("*.jpg"))
    a = [p.label_map for p in seg.predict([str(p) for p in photos], labels="cat,grass,sky")]
    b = [p.label_map for p in fp32.predict([str(p) for p in photos], labels="cat,grass,sky")]
    assert sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(x.size for x in a) > 0.8  # random weights: a loose bound
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["predict", str(photos[0]), "-m", str(tiny_checkpoint), "-l", "cat,sky", "-o", str(out),
                                   "--precision", "int8", "--device", "cpu", "-q"])
    assert run.exit_code == 0, run.output
    assert json.loads((out / ".segcli" / "run.json").read_text())["precision"] == "int8"
    again = CliRunner().invoke(app, ["predict", str(photos[0]), "-m", str(tiny_checkpoint), "-l", "cat,sky", "-o", str(out),
                                     "--precision", "fp32", "--device", "cpu", "-q"])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    with pytest.raises(SegcliError, match="int8 is for inference"):
        from segcli.inference.device import resolve_precision

        resolve_precision("int8", torch.device("cpu"), training=True)
