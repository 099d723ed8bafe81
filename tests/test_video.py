"""Videos as SOURCE: outputs, frame indices, equality with predict on the frames, resume, bad videos."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, TINY_LABELS
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def make_video(path: Path, frames: int = 12, size: tuple[int, int] = (160, 120), rate: int = 10,
               codec: str = "libx264", container_format: str | None = None) -> Path:
    """A pan across a sample photo, encoded here (no external file)."""
    w, h = size
    base = np.array(Image.open(SAMPLES / "cat.jpg").convert("RGB").resize((w + 4 * frames, h)))
    out = av.open(str(path), "w", format=container_format)
    stream = out.add_stream(codec, rate=rate)
    stream.width, stream.height = w, h
    stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, 4 * i:4 * i + w]), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path


def decoded_frames(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def predict(source: Path, out: Path, model: Path, *extra: str):
    return cli("predict", str(source), "-l", TINY_LABELS, "-m", str(model), "-o", str(out), "-q", *extra)


def test_video_outputs(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(folder / "pan.mp4", frames=12)
    make_video(folder / "odd.mkv", frames=5, size=(121, 91), container_format="matroska")
    Image.open(SAMPLES / "rocket.jpg").save(folder / "rocket.jpg")
    out = tmp_path / "out"
    result = predict(folder, out, tiny_checkpoint, "--vid-stride", "3")
    assert result.exit_code == 0, result.output
    for name, frames, size in (("pan", 12, (160, 120)), ("odd", 5, (121, 91))):
        processed = list(range(0, frames, 3))
        assert sorted(p.name for p in (out / f"{name}_masks").iterdir()) == [f"{i:06d}.png" for i in processed]
        mask = np.array(Image.open(out / f"{name}_masks" / "000000.png"))
        assert mask.shape == size[::-1] and mask.max() < 4
        for kind in ("color", "overlay"):
            with av.open(str(out / f"{name}_{kind}.mp4")) as video:
                stream = video.streams.video[0]
                assert (stream.width, stream.height) == size and float(stream.average_rate) == pytest.approx(10 / 3, rel=0.01)
                assert sum(1 for _ in video.decode(stream)) == len(processed)
        rows = list(csv.reader((out / f"{name}_labels.csv").open()))
        assert rows[0] == ["frame", "time_s", *TINY_LABELS.split(",")]
        assert [int(r[0]) for r in rows[1:]] == processed
        assert all(abs(sum(float(x) for x in r[2:]) - 1) < 1e-4 for r in rows[1:])
        assert [float(r[1]) for r in rows[1:]] == pytest.approx([i / 10 for i in processed], abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    pan = next(r for r in summary["images"] if r["output"] == "pan")
    assert pan["kind"] == "video" and pan["frames_read"] == 12 and pan["frames_processed"] == 4 and pan["fps"] == 10
    assert pan["duration_s"] == pytest.approx(1.2) and abs(sum(pan["labels"].values()) - 1) < 1e-4
    assert sorted(pan["files"]) == ["pan_color.mp4", "pan_labels.csv", "pan_masks", "pan_overlay.mp4"]
    assert (out / "rocket_mask.png").exists() and summary["counts"]["ok"] == 3
    assert not [p for p in out.rglob("*") if p.name.startswith(".segcli-tmp")]
    again = predict(folder, out, tiny_checkpoint, "--vid-stride", "3")  # finished videos are skipped
    assert again.exit_code == 0 and json.loads((out / "summary.json").read_text())["counts"]["reused"] == 3


def test_masks_equal_predict_on_the_frames_as_png(tmp_path, lively_checkpoint):
    tiny_checkpoint = lively_checkpoint  # masks that vary from frame to frame
    video = make_video(tmp_path / "pan.mp4", frames=10)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(decoded_frames(video)):
        image.save(frames / f"{i:06d}.png")
    a, b = tmp_path / "video_out", tmp_path / "png_out"
    assert predict(video, a, tiny_checkpoint, "--save", "mask", "-b", "4").exit_code == 0
    assert predict(frames, b, tiny_checkpoint, "--save", "mask", "-b", "4").exit_code == 0
    for i in range(10):
        assert (a / "pan_masks" / f"{i:06d}.png").read_bytes() == (b / f"{i:06d}_mask.png").read_bytes(), i


def flicker_video(path: Path, frames: int = 8) -> Path:
    """Two photos in turn: the worst flicker a frame-by-frame model can show."""
    photos = [np.array(Image.open(SAMPLES / f"{n}.jpg").convert("RGB").resize((160, 120))) for n in ("cat", "rocket")]
    out = av.open(str(path), "w")
    stream = out.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
    for i in range(frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(photos[i % 2], format="rgb24")):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return path


@pytest.fixture(scope="module")
def lively_checkpoint(tmp_path_factory) -> Path:
    """lseg_tiny with its initial BatchNorm statistics: its random masks follow the picture (the
    shared tiny checkpoint's randomised statistics give one label everywhere on these frames)."""
    import torch

    from segcli.modeling import build_model
    from segcli.models.checkpoint import save_checkpoint
    from segcli.vocabulary.labels import parse_labels

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("lively") / "tiny.safetensors"
    save_checkpoint(build_model("lseg_tiny"), path, labels=parse_labels(TINY_LABELS))
    return path


def test_smoothing_blends_consecutive_frames(tmp_path, lively_checkpoint):
    video = flicker_video(tmp_path / "pan.mp4", frames=8)
    plain, smooth = tmp_path / "plain", tmp_path / "smooth"
    assert predict(video, plain, lively_checkpoint, "--save", "mask").exit_code == 0
    assert predict(video, smooth, lively_checkpoint, "--save", "mask", "--smooth", "0.8").exit_code == 0
    first = [np.array(Image.open(d / "pan_masks" / "000000.png")) for d in (plain, smooth)]
    # the average starts at the first frame: the same mask, but for a few pixels at ties where two
    # runs' kernels rounded differently (seen with AVX2 fp32 kernels on a loaded machine)
    assert (first[0] != first[1]).mean() <= 1e-3

    def changes(folder: Path) -> int:  # pixels that change label from one frame to the next
        masks = [np.array(Image.open(p)) for p in sorted((folder / "pan_masks").iterdir())]
        return sum(int((x != y).sum()) for x, y in zip(masks, masks[1:]))

    assert changes(smooth) < changes(plain) / 2


def test_a_killed_run_redoes_only_the_unfinished_video(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "c"):
        make_video(folder / f"{name}.mp4", frames=60, size=(320, 240))
    clean = tmp_path / "clean"
    assert predict(folder, clean, tiny_checkpoint).exit_code == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(folder), "-l", TINY_LABELS, "-m",
                             str(tiny_checkpoint), "-o", str(out), "-q"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / ".segcli" / "records.jsonl"
    deadline = time.time() + 120  # killed once the first video is recorded as done (its files come before its record)
    while not (records.exists() and records.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "a_overlay.mp4").exists() and not (out / "c_overlay.mp4").exists()
    result = predict(folder, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["reused"] >= 1 and summary["counts"]["ok"] == 3
    files = {str(p.relative_to(clean)) for p in clean.rglob("*") if p.is_file() and ".segcli" not in p.parts}
    assert files == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".segcli" not in p.parts}
    for name in files - {"summary.json"}:
        if name.endswith(".mp4"):  # the encoder is deterministic; compare what a player sees all the same
            assert [np.asarray(f) for f in decoded_frames(out / name)][-1].shape == \
                   [np.asarray(f) for f in decoded_frames(clean / name)][-1].shape
        else:
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_bad_videos_never_stop_the_batch(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    good = make_video(folder / "good.mp4", frames=6)
    data = good.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "notes.mp4").write_text("this is not a video\n")
    (folder / "header_only.mov").write_bytes(data[:32])
    empty = av.open(str(folder / "empty.mp4"), "w")
    stream = empty.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    empty.start_encoding()  # the header, then no frame
    empty.close()
    make_video(folder / "huge.mkv", frames=3, size=(500, 400), container_format="matroska")
    Image.open(SAMPLES / "cat.jpg").save(folder / "cat.jpg")
    out = tmp_path / "out"
    result = predict(folder, out, tiny_checkpoint, "--max-pixels", "150000")
    assert result.exit_code == 1, result.output
    errors = {line.split(": ", 2)[1]: line for line in result.output.splitlines() if line.startswith("error: ")}
    assert sorted(Path(k).name for k in errors) == ["empty.mp4", "header_only.mov", "huge.mkv", "notes.mp4",
                                                    "truncated.mp4"], result.output
    assert "video frames are 500x400, above the 0.15 MP limit" in errors[str(folder / "huge.mkv")]
    assert "truncated" in errors[str(folder / "truncated.mp4")] or "cannot" in errors[str(folder / "truncated.mp4")]
    assert "Traceback" not in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"inputs": 7, "ok": 2, "failed": 5, "reused": 0, "not_done": 0}
    assert (out / "good_overlay.mp4").exists() and (out / "cat_overlay.jpg").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".segcli-tmp")]
    assert not (out / "truncated_masks").exists()  # a bad video leaves nothing behind


def test_videos_follow_the_photos_protocol_and_refinement(tmp_path):
    """clip-dense (NACLIP: windows over the short side and PAMR by default) on a video: each frame
    is read as predict reads a photo, so the masks equal predict's on the frames, and with
    --window 0 the one-canvas masks equal too."""
    from safetensors.torch import save_file
    from test_clip_dense import tiny_clip

    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip().state_dict().items()}, str(weights))
    video = make_video(tmp_path / "pan.mp4", frames=4)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, image in enumerate(decoded_frames(video)):
        image.save(frames / f"{i:06d}.png")
    for extra in ([], ["--window", "0", "--imgsz", "64"]):
        a, b = tmp_path / f"video_out{len(extra)}", tmp_path / f"png_out{len(extra)}"
        assert predict(video, a, weights, "--save", "mask", "--prompt", "a photo of a {}.", *extra).exit_code == 0
        result = predict(frames, b, weights, "--save", "mask", "--prompt", "a photo of a {}.", *extra)
        assert result.exit_code == 0, result.output
        for i in range(4):
            assert (a / "pan_masks" / f"{i:06d}.png").read_bytes() == (b / f"{i:06d}_mask.png").read_bytes(), (extra, i)
