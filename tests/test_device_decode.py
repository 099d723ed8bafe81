"""--decode device: plain JPEGs decoded in batches on the model's device (nvJPEG on CUDA), the rest on
the host. Tested on the CPU with the same code: torchvision's libjpeg decoder, or stubs that fail."""

from __future__ import annotations

import io
import json
import random
import struct

import numpy as np
import pytest
import torch
from conftest import SAMPLES, make_nasty_folder
from PIL import Image, ImageOps

from segcli.inference import device_decode
from segcli.inference.device_decode import DeviceDecoder, torchvision_decode
from segcli.inference.settings import InferenceSettings
from segcli.inputs.geometry import Protocol, model_pixels
from segcli.inputs.images import DEFAULT_MAX_PIXELS
from segcli.inputs.jpeg_probe import JpegProbe, probe_jpeg
from segcli.pipeline import host

CAT = Image.open(SAMPLES / "cat.jpg").convert("RGB")


def jpeg(image: Image.Image = CAT, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` with one more marker segment right after SOI."""
    return data[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + data[2:]


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def patch_frame(data: bytes, offset: int, value: int) -> bytes:
    """`data` with the byte at `offset` into the SOF0 payload replaced."""
    at = data.index(b"\xff\xc0") + 4 + offset
    return data[:at] + bytes([value]) + data[at + 1:]


def test_probe_takes_plain_jpegs_and_leaves_the_rest_to_the_host():
    assert probe_jpeg(jpeg(), DEFAULT_MAX_PIXELS) == JpegProbe((300, 451), 1)
    assert probe_jpeg(jpeg(CAT.convert("L")), DEFAULT_MAX_PIXELS) == JpegProbe((300, 451), 1)
    for subsampling in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        assert probe_jpeg(jpeg(subsampling=subsampling), DEFAULT_MAX_PIXELS) is not None
    png = io.BytesIO()
    CAT.save(png, "PNG")
    sof = jpeg()
    host_only = {
        "png": png.getvalue(),
        "progressive": jpeg(progressive=True),
        "cmyk": jpeg(CAT.convert("CMYK")),
        "12-bit": patch_frame(sof, 0, 12),
        "arithmetic": sof.replace(b"\xff\xc0", b"\xff\xc9", 1),
        "zero height": patch_frame(patch_frame(sof, 1, 0), 2, 0),
        "odd sampling": patch_frame(sof, 7, 0x13),
        "adobe rgb": with_segment(sof, 0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])),
        "two exif": with_segment(with_segment(sof, 0xE1, b"Exif\x00\x00" + exif_bytes(6)), 0xE1,
                                 b"Exif\x00\x00" + exif_bytes(3)),
        "xmp only": with_segment(sof, 0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"),
        "no scan": sof[:sof.index(b"\xff\xda")],
        "empty": b"",
        "soi only": b"\xff\xd8",
    }
    for name, data in host_only.items():
        assert probe_jpeg(data, DEFAULT_MAX_PIXELS) is None, name
    assert probe_jpeg(sof, max_pixels=451 * 300 - 1) is None  # the pixel limit: the host's error says why


def test_probe_survives_hostile_headers():
    """Random damage to a real header never raises or reads out of range; what it accepts has a sane size."""
    rng = random.Random(0)
    base = jpeg(exif=exif_bytes(6))
    header = base.index(b"\xff\xda") + 20
    for _ in range(3000):
        data = bytearray(base[:rng.randrange(2, len(base))] if rng.random() < 0.3 else base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(2, min(header, len(data)) or 3) if len(data) > 2 else 0:][:1] = bytes([rng.randrange(256)])
        probe = probe_jpeg(bytes(data), DEFAULT_MAX_PIXELS)
        if probe is not None:
            h, w = probe.stored_hw
            assert 0 < h * w <= DEFAULT_MAX_PIXELS and 1 <= probe.orientation <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_pixels_match_the_hosts_for_every_orientation(orientation):
    """Turned as Pillow's exif_transpose turns it, resized as the host resizes (at most 1 level apart)."""
    data = jpeg(exif=exif_bytes(orientation))
    probe = probe_jpeg(data, DEFAULT_MAX_PIXELS)
    assert probe.orientation == orientation == Image.open(io.BytesIO(data)).getexif()[0x0112]
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert probe.upright_hw == (upright.height, upright.width)
    for imgsz, protocol in ((384, Protocol()), (224, Protocol(short_side=336, window=224, stride=112))):
        (pixels, resized_hw), = DeviceDecoder("cpu", imgsz, protocol).model_pixels([data], [probe])
        want, want_hw = model_pixels(upright, imgsz, protocol)
        assert resized_hw == tuple(want_hw) and pixels.shape == want.shape and pixels.dtype == torch.uint8
        assert np.abs(pixels.numpy().astype(int) - want).max() <= 1


def test_large_photo_close_to_the_hosts_reduced_decode():
    """A 12 MP photo: the host decodes it DCT-reduced, the device at full size; the canvases stay close."""
    big = CAT.resize((4000, 3000), Image.BICUBIC)
    data = jpeg(big)
    (pixels, hw), = DeviceDecoder("cpu", 384, Protocol()).model_pixels([data], [probe_jpeg(data, DEFAULT_MAX_PIXELS)])
    plan = host.HostPlan(None, (), 0.5, 384, DEFAULT_MAX_PIXELS, None, None)
    want = host.decode(data, plan)
    assert hw == want.resized_hw == (288, 384)
    diff = np.abs(pixels.numpy().astype(int) - want.pixels)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8


class Stub:
    """A decoder that fails whole calls holding a "bad" file, and gives a wrong size for "liar" files."""

    def __init__(self, bad=(), liar=()):
        self.bad, self.liar, self.calls = set(bad), set(liar), []

    def __call__(self, encoded, device):
        self.calls.append(len(encoded))
        keys = [bytes(t[-8:].tolist()) for t in encoded]
        if self.bad & set(keys):
            raise RuntimeError("nvjpeg: bad file")
        out = torchvision_decode(encoded, device)
        return [img[:, 1:] if key in self.liar else img for img, key in zip(out, keys)]


def test_one_call_per_batch_and_per_file_fallback():
    files = [jpeg(CAT.rotate(angle)) for angle in range(5)]
    probes = [probe_jpeg(f, DEFAULT_MAX_PIXELS) for f in files]
    stub = Stub()
    got = DeviceDecoder("cpu", 128, Protocol(), decode=stub).model_pixels(files, probes)
    assert stub.calls == [5] and all(g is not None for g in got)  # one batched call

    stub = Stub(bad={files[1][-8:]}, liar={files[3][-8:]})
    got = DeviceDecoder("cpu", 128, Protocol(), decode=stub).model_pixels(files, probes)
    assert stub.calls == [5, 1, 1, 1, 1, 1]  # the batch failed: one call per file
    assert [g is None for g in got] == [False, True, False, True, False]  # refused, and a wrong size
    for g, want in zip(got, files):
        if g is not None:
            ref, _ = model_pixels(Image.open(io.BytesIO(want)).convert("RGB"), 128, Protocol())
            assert np.abs(g[0].numpy().astype(int) - ref).max() <= 1


def test_large_batches_are_split_by_pixels(monkeypatch):
    monkeypatch.setattr(device_decode, "CALL_PIXELS", 300 * 451 * 2)
    files = [jpeg()] * 5
    stub = Stub()
    DeviceDecoder("cpu", 64, Protocol(), decode=stub).model_pixels(files, [probe_jpeg(files[0], 10**8)] * 5)
    assert stub.calls == [2, 2, 1]


def test_predict_decode_device_matches_host(tmp_path, tiny_checkpoint, monkeypatch):
    """Every input of a messy folder: the same records (statuses, sizes, errors) with the JPEGs
    decoded on the device as on the host, and nearly the same model inputs; the device decoded
    the plain JPEGs, one call per batch."""
    from segcli.inference.runner import host_pixels
    from segcli.inference.segmenter import Segmenter
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.model_step import ModelStep
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import parse_labels

    photos = tmp_path / "photos"
    kinds = make_nasty_folder(photos)
    CAT.save(photos / "progressive.jpg", progressive=True)
    CAT.resize((1800, 1200)).save(photos / "large.jpg", quality=90)
    Image.open(SAMPLES / "rocket.jpg").save(photos / "sub_rocket.jpg", exif=exif_bytes(8))
    # at 384 the host's reduced decode keeps the full size's rounding (at 128, rocket.jpg's image is
    # 86 rows on the host, from its 1/4 decode, and 85 on the device, from its full size)
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32", imgsz=384)
    inputs: dict[str, dict[str, np.ndarray]] = {"host": {}, "device": {}}
    infer = ModelStep.infer

    def recorded_infer(self, batch, text):
        for item in batch:  # what the model was given
            inputs[where][str(item.source.rel)] = host_pixels(item.model_input.pixels)
        return infer(self, batch, text)

    monkeypatch.setattr(ModelStep, "infer", recorded_infer)
    runs = {}
    for where in ("host", "device"):
        options = RunOptions(labels=parse_labels("a,b,c,d"), output=tmp_path / where, decode=where,
                                 batch_size=4, workers=2, save=("mask",))
        run = PredictRun(seg, options, collect_sources([str(photos)]))
        runs[where] = (run, {r["input"]: r for r in run.run().records})
    device = runs["device"][0].device_inputs
    # plain JPEGs: rotated, café_猫, large, sub_rocket; the truncated one's header passes, the device refuses it
    assert (device.decoded, device.refused) == (4, 1) and device.decoder.calls <= 5
    assert runs["host"][0].device_inputs is None
    host_records, device_records = runs["host"][1], runs["device"][1]
    assert host_records.keys() == device_records.keys() and len(host_records) == len(kinds) + 3
    for name, want in host_records.items():
        got = device_records[name]
        assert (got["status"], got.get("error"), got.get("width"), got.get("height")) == \
               (want["status"], want.get("error"), want.get("width"), want.get("height")), name
    assert inputs["host"].keys() == inputs["device"].keys()
    for rel, want in inputs["host"].items():
        got = inputs["device"][rel]
        diff = np.abs(got.astype(int) - want)
        assert got.shape == want.shape and diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, rel  # the host decodes DCT-reduced
    summary = json.loads((tmp_path / "device" / "summary.json").read_text())
    assert summary["counts"]["failed"] == sum(k == "bad" for k in kinds.values())


def test_decode_choices(tiny_checkpoint):
    from segcli.errors import SegcliError
    from segcli.inference.segmenter import Segmenter
    from segcli.pipeline.device_inputs import decodes_on_device
    from segcli.pipeline.options import PredictOptions

    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    assert not decodes_on_device("auto", seg)  # a CPU: the workers decode
    assert decodes_on_device("device", seg) and not decodes_on_device("host", seg)
    with pytest.raises(SegcliError, match="--decode 'gpu': use auto, host or device"):
        decodes_on_device("gpu", seg)
    with pytest.raises(SegcliError, match="--decode device is for --engine local"):
        PredictOptions(engine="ray", decode="device").validate()
    with pytest.raises(SegcliError, match="--decode 'gpu': use auto, host or device"):
        PredictOptions(decode="gpu").validate()


def test_device_pixels_feed_refinement_embeddings_and_windows(tmp_path, tiny_checkpoint):
    """Outputs that read the model's pixels on the host (PAMR, stored embeddings, sliding windows)
    take the device's pixels copied back: the same files as from the host's decode, nearly."""
    from segcli.embeddings.format import read_tensor
    from segcli.inference.segmenter import Segmenter
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import parse_labels

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat", "rocket"):
        (photos / f"{name}.jpg").write_bytes((SAMPLES / f"{name}.jpg").read_bytes())
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu", precision="fp32")
    for save, refine, window in ((("mask", "embeddings"), "pamr", 0), (("mask",), "none", 64)):
        seg.configure(InferenceSettings(window=window))
        out = {}
        for where in ("host", "device"):
            options = RunOptions(labels=parse_labels("a,b,c"), output=tmp_path / f"{where}{window}", decode=where,
                                     save=save, refine=refine, workers=1)
            run = PredictRun(seg, options, collect_sources([str(photos)]))
            assert run.run().failed == 0
            assert where == "host" or run.device_inputs.decoded == 2
            out[where] = tmp_path / f"{where}{window}"
        for name in ("cat", "rocket"):
            masks = [np.array(Image.open(out[w] / f"{name}_mask.png")) for w in ("host", "device")]
            assert masks[0].shape == masks[1].shape and (masks[0] == masks[1]).mean() > 0.9
            if "embeddings" in save:
                emb = [read_tensor(out[w] / f"{name}_embed.safetensors").float() for w in ("host", "device")]
                assert emb[0].shape == emb[1].shape and torch.nn.functional.cosine_similarity(*emb, dim=0).mean() > 0.95


def test_cli_refuses_an_unknown_decode(tmp_path):
    from typer.testing import CliRunner

    from segcli.cli import app

    result = CliRunner().invoke(app, ["predict", str(SAMPLES / "cat.jpg"), "-l", "a,b", "-m", "lseg_tiny",
                                      "-o", str(tmp_path / "o"), "--decode", "gpu"])
    assert result.exit_code == 2 and "--decode 'gpu': use auto, host or device" in result.output
    assert not (tmp_path / "o").exists()
