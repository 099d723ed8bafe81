"""predict's --compile: the compiled image branch gives eager's masks, pads a short last batch to the
compiled shape, and a model it does not fit is refused in one line (or, under auto, left as it is)."""

from __future__ import annotations

import pytest
from conftest import SAMPLES, TINY_LABELS
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.errors import SegcliError
from segcli.inference.segmenter import Segmenter
from segcli.pipeline.launch import COMPILE_FROM, should_compile


@pytest.mark.slow
def test_compiled_masks_are_eagers(tiny_checkpoint):
    images = [Image.open(SAMPLES / n).convert("RGB").resize((120, 90)) for n in ("cat.jpg", "rocket.jpg", "coffee.jpg")]
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    eager = [p.label_map for p in seg.predict(images, labels=TINY_LABELS, batch_size=2)]
    assert seg.compile(2) > 0 and seg.compiled_batch == 2
    compiled = [p.label_map for p in seg.predict(images, labels=TINY_LABELS, batch_size=2)]  # 2, then 1 padded to 2
    same = sum(int((a == b).sum()) for a, b in zip(eager, compiled)) / sum(a.size for a in eager)
    assert same >= 0.999 and all(a.shape == b.shape for a, b in zip(eager, compiled))


def test_what_compiles_and_what_is_refused(tiny_checkpoint, tmp_path):
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="int8")
    with pytest.raises(SegcliError, match="--compile needs"):
        seg.compile(2)
    assert not should_compile("auto", seg, 10_000)  # int8: left as it is
    plain = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu")
    assert should_compile("auto", plain, COMPILE_FROM) and not should_compile("auto", plain, COMPILE_FROM - 1)
    assert should_compile("on", plain, 1) and not should_compile("off", plain, 10_000)
    run = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-m", str(tiny_checkpoint), "-l", TINY_LABELS,
                                   "--precision", "int8", "--compile", "on", "-o", str(tmp_path / "o")])
    assert run.exit_code == 2 and "--compile needs" in run.stderr and len(run.stderr.strip().splitlines()) == 1
