"""`segcli predict` end to end: outputs, nasty inputs, containment, resume, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, TINY_LABELS, make_nasty_folder
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app


def run(args, stdin=None):
    return CliRunner().invoke(app, ["predict", *args], input=stdin)


def copies(photo: Path, folder: Path, count: int) -> Path:
    """`folder` holding `count` copies of `photo`."""
    folder.mkdir(parents=True)
    for i in range(count):
        shutil.copy(photo, folder / f"p{i:03d}{photo.suffix}")
    return folder


def outputs_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".segcli" not in p.parts and p.name != "summary.json"}


def test_predict_sample_images(tmp_path, tiny_checkpoint, samples):
    out = tmp_path / "out"
    result = run([str(samples), "--labels", TINY_LABELS, "--model", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("astronaut", "cat", "coffee", "rocket"):
        size = Image.open(SAMPLES / f"{name}.jpg").size
        mask = np.array(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8 and mask.max() < 4
        color = Image.open(out / f"{name}_color.png")
        assert color.size == size and color.mode == "P"  # a palette PNG: the mask's indices, shown in colors
        assert np.array_equal(np.array(color), mask)
        palette = np.array([entry["color"] for entry in json.loads((out / "labels.json").read_text())], np.uint8)
        assert np.array_equal(np.array(color.convert("RGB")), palette[mask])
        assert Image.open(out / f"{name}_overlay.jpg").size == size
    labels = json.loads((out / "labels.json").read_text())
    assert [entry["label"] for entry in labels] == ["cat", "grass", "sky", "person"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"inputs": 4, "ok": 4, "failed": 0, "reused": 0, "not_done": 0}
    assert summary["skipped_non_images"] == [str(samples / "CREDITS.md")]
    cat = next(r for r in summary["images"] if r["output"] == "cat")
    assert cat["width"] == 451 and cat["height"] == 300 and abs(sum(cat["labels"].values()) - 1) < 1e-4
    assert not list(out.rglob(".segcli-tmp-*"))


def test_labels_default_to_the_checkpoints_and_json_lines(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(SAMPLES)
    out = tmp_path / "out"
    result = run(["cat.jpg", "--model", str(tiny_checkpoint), "-o", str(out), "--json",
                  "--save", "mask", "-q"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["status"] == "ok" and lines[0]["files"] == ["cat_mask.png"]
    assert sorted(p.name for p in out.iterdir()) == [".segcli", "cat_mask.png", "labels.json", "summary.json"]


def test_nasty_folder(tmp_path, tiny_checkpoint):
    kinds = make_nasty_folder(tmp_path / "nasty")
    out = tmp_path / "out"
    result = run([str(tmp_path / "nasty"), "--labels", "a,b,c", "--model", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    status = {Path(r["input"]).name: r for r in summary["images"]}
    assert set(status) == set(kinds)
    for name, kind in kinds.items():
        assert (status[name]["status"] == "ok") == (kind == "good"), (name, status[name])
        if kind == "bad":
            assert name in result.stderr and status[name]["error"]
    assert "decompression bomb" in status["bomb.png"]["error"]
    assert "not an image" in status["notes.jpg"]["error"]
    # EXIF orientation applied: the cat is 451x300 stored, rotated 90 degrees on display
    assert np.array(Image.open(out / "rotated_mask.png")).shape == (451, 300)
    assert np.array(Image.open(out / "dot_mask.png")).shape == (1, 1)
    assert (out / "café_猫_mask.png").exists() and (out / "no_extension_overlay.jpg").exists()
    assert not (out / "truncated_mask.png").exists()


def test_outputs_stay_inside_dir(tmp_path, tiny_checkpoint, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "a").mkdir()
    shutil.copy(SAMPLES / "cat.jpg", tmp_path / "a" / "up.jpg")
    monkeypatch.chdir(work)
    out = work / "out"
    stdin = f"../a/up.jpg\n{SAMPLES / 'coffee.jpg'}\n"
    result = run(["-", "--labels", "a,b", "--model", str(tiny_checkpoint), "-o", "out", "--save", "mask"], stdin)
    assert result.exit_code == 0, result.output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.png"))
    shared = Path(os.path.commonpath([tmp_path, SAMPLES]))  # the deepest folder both inputs are in
    assert written == sorted([str((tmp_path / "a" / "up_mask.png").relative_to(shared)),
                              str((SAMPLES / "coffee_mask.png").relative_to(shared))])
    assert sorted(os.listdir(tmp_path)) == ["a", "work"]

    # a symlink planted inside DIR cannot redirect writes outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    result = run(["-", "--labels", "a,b", "--model", str(tiny_checkpoint), "-o", "out", "--save", "mask", "--overwrite"],
                 "../a/up.jpg\n")
    assert result.exit_code == 0 and (out / "up_mask.png").is_file()
    (out / "up_mask.png").unlink()
    (tmp_path / "a" / "sub").mkdir()
    shutil.copy(SAMPLES / "cat.jpg", tmp_path / "a" / "sub" / "deep.jpg")
    (out / "sub").symlink_to(outside, target_is_directory=True)
    result = run(["-", "--labels", "a,b", "--model", str(tiny_checkpoint), "-o", "out", "--save", "mask", "--overwrite"],
                 "../a/up.jpg\n../a/sub/deep.jpg\n")
    assert result.exit_code == 1 and "outside" in result.stderr
    assert list(outside.iterdir()) == []


def test_a_single_file_lands_directly_in_dir(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run([str(SAMPLES / "cat.jpg"), "--labels", "a,b", "--model", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "cat_color.png", "cat_mask.png", "cat_overlay.jpg", "labels.json", "summary.json"]


def test_rerun_skips_done_images_and_refuses_other_settings(tmp_path, tiny_checkpoint, samples):
    out = tmp_path / "out"
    args = [str(samples), "--labels", "cat,sky", "--model", str(tiny_checkpoint), "-o", str(out)]
    assert run(args).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    shutil.copy(SAMPLES / "cat.jpg", samples / "new.jpg")
    result = run(args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["reused"] == 4 and summary["counts"]["ok"] == 5
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (out / "new_mask.png").exists()

    other = run([str(samples), "--labels", "cat,dog", "--model", str(tiny_checkpoint), "-o", str(out)])
    assert other.exit_code == 2 and "labels" in other.stderr and "--overwrite" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    forced = run([str(samples), "--labels", "cat,dog", "--model", str(tiny_checkpoint), "-o", str(out), "--overwrite"])
    assert forced.exit_code == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["reused"] == 0


def test_default_output_is_a_new_numbered_run(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLES / "cat.jpg", tmp_path / "cat.jpg")
    for n in (1, 2):
        result = run(["cat.jpg", "-l", "a,b", "-m", str(tiny_checkpoint), "--save", "mask"])
        assert result.exit_code == 0
        assert (tmp_path / "runs" / "predict" / str(n) / "cat_mask.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--labels", ",,"], "no labels"),
    (["--labels", "a,b,a"], "duplicate label"),
    (["--model", "missing.safetensors"], "not found"),
    (["--model", "no_such_arch"], "neither a file, clip-dense"),
    (["--device", "tpu"], "unknown device"),
    (["--device", "cuda:7"], "cuda"),
    (["--save", "mask,pdf"], "--save"),
    (["--imgsz", "100"], "multiple of 32"),
    (["--prompt", "a photo"], "{}"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_checkpoint, args, message):
    base = {"--labels": "a,b", "--model": str(tiny_checkpoint), "-o": str(tmp_path / "out")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    result = run([str(SAMPLES / "cat.jpg"), *flat])
    assert result.exit_code == 2, result.output
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_environment_errors_exit_2(tmp_path, tiny_checkpoint):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage" * 10)
    result = run([str(SAMPLES / "cat.jpg"), "-l", "a", "-m", str(corrupt), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not a valid safetensors" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run([str(SAMPLES / "cat.jpg"), "-l", "a", "-m", str(tiny_checkpoint), "-o", str(blocker / "out")])
    assert result.exit_code == 2 and "cannot be created" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run([str(empty), "-l", "a", "-m", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "no images or videos found" in result.stderr
    result = run([str(tmp_path / "nothing_here"), "-l", "a", "-m", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "no such file" in result.stderr


def test_untrained_architecture_warns(tmp_path):
    result = run([str(SAMPLES / "cat.jpg"), "-l", "a,b", "-m", "lseg_tiny", "-o", str(tmp_path / "o"), "--save", "mask"])
    assert result.exit_code == 0 and "untrained" in result.stderr and "meaningless" in result.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(tmp_path, tiny_checkpoint):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        shutil.copy(SAMPLES / ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")[i % 4], photos / f"p{i:02d}.jpg")
    cmd = [sys.executable, "-m", "segcli", "predict", str(photos), "-l", "cat,sky,road", "-m", str(tiny_checkpoint),
           "--batch-size", "1", "--imgsz", "256", "-q"]
    reference = tmp_path / "reference"
    assert subprocess.run(cmd + ["-o", str(reference)], capture_output=True).returncode == 0

    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_overlay.jpg"))) < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.glob("*_overlay.jpg"))
    assert 0 < len(done) < 40, "the kill should land mid-run"
    for p in out.glob("p*"):
        if not p.name.startswith("."):
            Image.open(p).load()  # every visible file is whole

    result = subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob(".segcli-tmp-*"))
    assert outputs_of(out) == outputs_of(reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 40 and summary["counts"]["reused"] >= len(done) - 3


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_exit_130(tmp_path, tiny_checkpoint):
    photos = copies(SAMPLES / "rocket.jpg", tmp_path / "photos", 60)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(photos), "-l", "a,b", "-m", str(tiny_checkpoint),
                             "-o", str(out), "-b", "1", "--imgsz", "256", "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_overlay.jpg"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 0 < summary["counts"]["ok"] < 60
    assert not list(out.rglob(".segcli-tmp-*"))


@pytest.mark.parametrize("argv", [["predict", "x.jpg", "--alpha", "2"], ["predict", "--bogus"], ["info"], ["frobnicate"]])
def test_command_line_mistakes_get_one_line_and_exit_2(argv, capsys):
    from segcli.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "--help" in err


def test_two_shards_into_one_dir_give_the_same_files_as_one_run(tmp_path, tiny_checkpoint, samples):
    (samples / "notes.txt").write_text("not an image")
    common = [str(samples), "--labels", TINY_LABELS, "--model", str(tiny_checkpoint), "-q"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert run([*common, "-o", str(single)]).exit_code == 0
    assert run([*common, "-o", str(sharded), "--shard", "1/2"]).exit_code == 0
    early = run(["--merge-summaries", str(sharded)])
    assert early.exit_code == 2 and "shard(s) 0 of 2 have not finished" in early.output
    assert run([*common, "-o", str(sharded), "--shard", "0/2"]).exit_code == 0
    merged = run(["--merge-summaries", str(sharded)])
    assert merged.exit_code == 0, merged.output
    assert outputs_of(single).keys() - {"labels.json"} == outputs_of(sharded).keys() - {
        "labels.json", "summary.shard-0-of-2.json", "summary.shard-1-of-2.json"}
    for name, data in outputs_of(single).items():
        assert outputs_of(sharded)[name] == data, name

    def comparable(summary: dict) -> dict:
        summary = {k: v for k, v in summary.items() if k not in ("merged_from", "shard")}
        summary["images"] = [{k: v for k, v in r.items() if k != "seconds"} for r in summary["images"]]
        return summary

    one = json.loads((single / "summary.json").read_text())
    both = json.loads((sharded / "summary.json").read_text())
    assert comparable(both) == comparable(one)
    assert both["counts"]["ok"] == 4 and both["skipped_non_images"] == one["skipped_non_images"] != []


@pytest.mark.slow
def test_torchrun_ranks_are_shards_and_rank_0_merges(tmp_path, tiny_checkpoint, samples):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "segcli", "predict", str(samples), "-l", TINY_LABELS, "-m", str(tiny_checkpoint),
                             "-o", str(out), "--save", "mask", "-q"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    parts = [json.loads((out / f"summary.shard-{i}-of-2.json").read_text()) for i in range(2)]
    assert sorted(len(p["images"]) for p in parts) == [2, 2]
    merged = json.loads((out / "summary.json").read_text())
    assert merged["counts"]["ok"] == 4 and len({r["output"] for r in merged["images"]}) == 4
    assert len(list(out.glob("*_mask.png"))) == 4


def test_device_postprocessing_gives_the_host_paths_results(tmp_path, tiny_checkpoint, samples):
    """The torch path (restore, color, blend, JPEG on the model's device) run on the CPU."""
    outs = {}
    for where in ("host", "device"):
        outs[where] = tmp_path / where
        result = run([str(samples), "--labels", "cat,grass,sky,person,tree,road", "--model", str(tiny_checkpoint),
                      "-o", str(outs[where]), "--postprocess", where, "-q"])
        assert result.exit_code == 0, result.output
    for name in ("astronaut", "cat", "coffee", "rocket"):
        host_mask, device_mask = (np.array(Image.open(outs[w] / f"{name}_mask.png")) for w in ("host", "device"))
        assert (host_mask == device_mask).mean() > 0.999  # interpolation ties only
        same = host_mask == device_mask
        colors = [np.array(Image.open(outs[w] / f"{name}_color.png").convert("RGB")) for w in ("host", "device")]
        assert np.array_equal(colors[0][same], colors[1][same])
        overlays = [np.array(Image.open(outs[w] / f"{name}_overlay.jpg")).astype(int) for w in ("host", "device")]
        assert overlays[0].shape == overlays[1].shape and np.abs(overlays[0] - overlays[1]).mean() < 2.0  # two JPEG encoders
    summaries = [json.loads((outs[w] / "summary.json").read_text())["images"] for w in ("host", "device")]
    assert [r["labels"].keys() for r in summaries[0]] == [r["labels"].keys() for r in summaries[1]]


@pytest.mark.slow
def test_workers_end_when_the_run_is_killed_outright(tmp_path, tiny_checkpoint):
    folder = copies(SAMPLES / "coffee.jpg", tmp_path / "many", 200)
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(folder), "-l", "a,b", "-m", str(tiny_checkpoint),
                             "-o", str(tmp_path / "out"), "-q"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "out").glob("*_mask.png")):
        time.sleep(0.05)

    def children(pids: set[int]) -> set[int]:
        found = set()
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                ppid = int(next(line for line in status.read_text().splitlines() if line.startswith("PPid:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            if ppid in pids:
                found.add(int(status.parent.name))
        return found

    def alive(pids: set[int]) -> set[int]:
        return {pid for pid in pids if Path(f"/proc/{pid}").exists()
                and "zombie" not in Path(f"/proc/{pid}/status").read_text()}

    spawned = children({proc.pid})  # the worker processes
    spawned |= children(spawned)
    assert len(spawned) >= 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and alive(spawned):
        time.sleep(0.2)
    assert not alive(spawned)  # no process of the killed run is left behind


def test_default_workers_use_the_cores_the_model_does_not(monkeypatch):
    import torch

    from segcli.pipeline.workers import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert default_workers(torch.device("cpu")) == 2  # the model needs the cores
    assert default_workers(torch.device("cuda")) == 16  # the host feeds a GPU: all but one, at most 16
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_workers(torch.device("cuda")) == 3


def test_unknown_postprocess_is_refused_before_the_output_folder_is_made(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run([str(SAMPLES / "cat.jpg"), "-l", "a,b", "-m", str(tiny_checkpoint), "-o", str(out), "--postprocess", "gpu"])
    assert result.exit_code == 2 and result.stderr.strip() == "error: --postprocess 'gpu': use host, auto or device"
    assert not out.exists()


@pytest.mark.slow
def test_a_worker_killed_from_outside_costs_only_a_retry(tmp_path, tiny_checkpoint):
    """As the OOM killer would: the inputs the dead worker's pool held run again, one at a time, and
    pass (they were not to blame); the run finishes with every photo done (tests/test_worker_crash.py:
    an input that kills its worker again fails alone)."""
    folder = copies(SAMPLES / "coffee.jpg", tmp_path / "many", 300)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(folder), "-l", "a,b", "-m", str(tiny_checkpoint),
                             "-o", str(out), "-q", "-j", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*_mask.png")):
        time.sleep(0.05)
    server = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/status")
              if f"PPid:\t{proc.pid}\n" in _read(p)]
    workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/status") if any(f"PPid:\t{s}\n" in _read(p) for s in server)]
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and stderr.strip() == "", stderr
    assert not list(out.rglob(".segcli-tmp-*"))  # every file written is whole
    assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 300
    width, height = Image.open(SAMPLES / "coffee.jpg").size
    masks = list(out.glob("*_mask.png"))
    assert len(masks) == 300
    for mask in masks[::30]:
        assert np.array(Image.open(mask)).shape == (height, width)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
