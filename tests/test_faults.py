"""Faults a night-long batch meets: a failing output disk, the umask, two runs at once, inputs that
change under the run, and training's folder. Every fault ends in one line, loses nothing, and the
next run ends with the same files as a run that met no fault."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES, TINY_LABELS, small_photos
from PIL import Image
from typer.testing import CliRunner

from segcli.cli import app
from segcli.files import atomic as fileio
from segcli.files.lock import Holder, _pid_start
from segcli.pipeline import host

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def segcli(*args: str, umask: int | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcli", *args], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None, timeout=300, **kw)


def outputs_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".segcli" not in p.parts and p.name != "summary.json"}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(fileio.TMP_PREFIX)]


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three small JPEGs, one in a subfolder."""
    return small_photos(tmp_path / "photos", {"cat": "cat", "coffee": "coffee", "rocket": "sub/rocket"}, 160)


def predict_args(photos: Path, out: Path, tiny_checkpoint: Path, *extra: str) -> list[str]:
    return ["predict", str(photos), "--labels", TINY_LABELS, "--model", str(tiny_checkpoint), "-o", str(out),
            "--workers", "1", "-q", *extra]


class FailingWrites:
    """fileio.write_all (every byte segcli writes goes through it) failing with `code` at the N-th call:
    only that call (`once`), or that call and every later one (a disk that stays full). A failing
    call first writes half its bytes, as a short write on a nearly full disk does."""

    real = staticmethod(fileio.write_all)

    def __init__(self, monkeypatch, code: int, at: int, once: bool):
        self.calls, self.code, self.at, self.once = 0, code, at, once
        real = FailingWrites.real

        def write(fd, data):
            self.calls += 1
            if self.calls == self.at or (not self.once and self.calls > self.at):
                os.write(fd, bytes(memoryview(data)[:len(data) // 2]))
                raise OSError(self.code, os.strerror(self.code))
            real(fd, data)

        monkeypatch.setattr(fileio, "write_all", write)


def one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.mark.slow
def test_a_write_failing_at_every_point_loses_nothing(photos, tmp_path, tiny_checkpoint, monkeypatch):
    """For every N: the N-th write fails (disk full from then on; an I/O error once; a permission
    error once). The run ends in one line (exit 2 when it stopped, 1 when one input failed), leaves no
    temp file and no lock, and the next run ends with the files of a run that met no fault."""
    # writes happen in this process (the device path's writer threads), where the patch applies
    device = ("--postprocess", "device")
    clean = tmp_path / "clean"
    counter = FailingWrites(monkeypatch, errno.ENOSPC, at=10**9, once=True)
    assert cli(*predict_args(photos, clean, tiny_checkpoint, *device)).exit_code == 0
    expected, writes = outputs_of(clean), counter.calls
    assert len(expected) == 3 * 3 + 1 and writes >= len(expected) + 3  # outputs, labels.json, records, run.json, lock

    tried = whole = 0
    for code, once in ((errno.ENOSPC, False), (errno.EIO, True), (errno.EACCES, True)):
        for n in range(1, writes + 1):
            out = tmp_path / f"run_{code}_{n}"
            FailingWrites(monkeypatch, code, at=n, once=once)
            result = cli(*predict_args(photos, out, tiny_checkpoint, *device))
            tried += 1
            assert result.exit_code in (1, 2), (code, n, result.output)
            line = one_error_line(result.output)  # exit 2: the run stopped; 1: that input failed
            if code != errno.EACCES:  # a disk errno always stops the run, whichever write met it
                assert result.exit_code == 2 and os.strerror(code) in line, (n, result.output)
            if out.exists():
                assert not temp_files(out), (code, n)
                assert not list((out / ".segcli").glob("lock*.json")), (code, n)
            monkeypatch.setattr(fileio, "write_all", FailingWrites.real)  # no more faults
            again = cli(*predict_args(photos, out, tiny_checkpoint, *device))
            assert again.exit_code == 0, (code, n, again.output)
            assert outputs_of(out) == expected, (code, n)
            summary = json.loads((out / "summary.json").read_text())
            assert summary["counts"]["ok"] == 3 and summary["stopped"] is None
            whole += 1
    print(f"{tried} injected faults, {whole} ended with nothing lost")
    assert whole == tried == 3 * writes


def test_disk_full_mid_run_stops_cleanly_with_a_summary(photos, tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = host.atomic_write_bytes

    def full_after_two_outputs(path, data):  # the third output file meets a full disk, and so does all after it
        if Path(path).name.endswith((".png", ".jpg")):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(host, "atomic_write_bytes", full_after_two_outputs)
    result = cli(*predict_args(photos, out, tiny_checkpoint, "--postprocess", "device", "--save", "mask"))
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert f"stopped: cannot write to {out}: No space left on device (2 of 3 inputs done, summary.json written)" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 2 and summary["counts"]["not_done"] == 1 and summary["counts"]["failed"] == 0
    assert summary["stopped"].startswith("cannot write to")
    records = [json.loads(x) for x in (out / ".segcli" / "records.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"]  # the input that met the full disk is not done, not failed


def test_a_really_full_disk(samples, tmp_path, tiny_checkpoint, small_disk):
    """A real tmpfs too small for the outputs, with real worker processes: exit 2, one line, no temp
    files; made bigger, the same command finishes with the files of a clean run."""
    clean = tmp_path / "clean"
    args = ["predict", str(samples), "--labels", TINY_LABELS, "--model", str(tiny_checkpoint), "-q"]
    assert segcli(*args, "-o", str(clean)).returncode == 0
    total = sum(len(b) for b in outputs_of(clean).values())
    subprocess.run(["mount", "-o", f"remount,size={total // 2 // 4096 * 4096}", str(small_disk)], check=True)
    out = small_disk / "out"
    result = segcli(*args, "-o", str(out))
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "No space left on device" in line and "run the same command to finish" in line
    assert not temp_files(out) and not list((out / ".segcli").glob("lock*.json"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    result = segcli(*args, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert outputs_of(out) == outputs_of(clean)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_and_folders_honour_the_umask(photos, tmp_path, tiny_checkpoint, umask):
    out = tmp_path / "out"
    result = segcli(*predict_args(photos, out, tiny_checkpoint), umask=umask)
    assert result.returncode == 0, result.stderr
    files = [out / "cat_mask.png", out / "cat_overlay.jpg", out / "sub" / "rocket_color.png", out / "summary.json",
             out / "labels.json", out / ".segcli" / "records.jsonl", out / ".segcli" / "run.json"]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for folder in (out, out / "sub", out / ".segcli"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder


# --- two runs, one folder ----------------------------------------------------------------------

def write_lock(folder: Path, pid: int, name: str = "lock.json", what: str = "predict") -> Path:
    path = folder / ".segcli" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Holder(socket.gethostname(), pid, _pid_start(pid), "2026-11-26 01:00:00", what)
    path.write_text(json.dumps(holder.__dict__))
    return path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_run_into_a_busy_folder_is_refused(photos, tmp_path, tiny_checkpoint, live_pid):
    out = tmp_path / "out"
    lock = write_lock(out, live_pid)
    result = cli(*predict_args(photos, out, tiny_checkpoint))
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert f"{out} is in use by another segcli run (predict, pid {live_pid} on {socket.gethostname()}" in line
    assert not outputs_of(out) and lock.exists()  # nothing written, the holder's lock untouched


def test_a_stale_lock_is_taken_over_with_a_warning(photos, tmp_path, tiny_checkpoint, dead_pid):
    out = tmp_path / "out"
    write_lock(out, dead_pid)
    result = cli(*predict_args(photos, out, tiny_checkpoint))
    assert result.exit_code == 0, result.output
    assert f"warning: {out}: taking over the lock of a run that is gone (predict, pid {dead_pid}" in result.output
    assert len(outputs_of(out)) == 10 and not list((out / ".segcli").glob("lock*.json"))


def test_a_reused_pid_does_not_hold_a_lock(photos, tmp_path, tiny_checkpoint, live_pid):
    """The pid is running, but it is not the process that took the lock (it started at another time)."""
    out = tmp_path / "out"
    path = write_lock(out, live_pid)
    holder = json.loads(path.read_text())
    path.write_text(json.dumps({**holder, "pid_start": (holder["pid_start"] or 0) - 1}))
    result = cli(*predict_args(photos, out, tiny_checkpoint))
    assert result.exit_code == 0 and "taking over the lock" in result.output


def test_shards_of_one_split_share_the_folder(photos, tmp_path, tiny_checkpoint, live_pid):
    out = tmp_path / "out"
    write_lock(out, live_pid, "lock.shard-0-of-2.json", "predict shard 0/2")
    assert cli(*predict_args(photos, out, tiny_checkpoint, "--shard", "1/2")).exit_code == 0
    for refused in (["--shard", "0/2"], ["--shard", "1/3"], []):
        result = cli(*predict_args(photos, out, tiny_checkpoint, *refused))
        assert result.exit_code == 2 and "in use by another segcli run (predict shard 0/2" in result.output, refused


def test_two_real_runs_at_once_one_is_refused(tmp_path, tiny_checkpoint):
    photos = tmp_path / "many"
    photos.mkdir()
    shutil.copy(SAMPLES / "cat.jpg", photos / "p000.jpg")
    for i in range(1, 60):
        os.link(photos / "p000.jpg", photos / f"p{i:03d}.jpg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segcli", *predict_args(photos, out, tiny_checkpoint, "--save", "mask")]
    first = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".segcli" / "lock.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # the first holds the folder for as long as the second needs, however loaded the machine
    try:
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "is in use by another segcli run" in second.stderr, second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    records = [json.loads(x) for x in (out / ".segcli" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 60 == len({r["output"] for r in records})  # each photo done once


# --- inputs that change under the run -----------------------------------------------------------

def test_inputs_deleted_truncated_or_gone_after_listing(photos, tmp_path, tiny_checkpoint):
    from segcli.api import Segmenter
    from segcli.inputs.sources import collect_sources
    from segcli.pipeline.run import PredictRun, RunOptions
    from segcli.vocabulary.labels import parse_labels

    extra = photos / "gone"
    extra.mkdir()
    shutil.copy(photos / "cat.jpg", extra / "a.jpg")
    found = collect_sources([str(photos)])
    (photos / "coffee.jpg").unlink()
    (photos / "cat.jpg").write_bytes((photos / "cat.jpg").read_bytes()[:300])
    shutil.rmtree(extra)
    seg = Segmenter.from_pretrained(str(tiny_checkpoint), device="cpu")
    result = PredictRun(seg, RunOptions(parse_labels(TINY_LABELS), output=tmp_path / "out", workers=1), found).run()
    errors = {r["output"]: r.get("error") for r in result.records}
    assert errors["sub/rocket"] is None
    assert errors["coffee"] == errors["gone/a"] == "file not found (deleted since the inputs were listed)"
    assert errors["cat"].startswith("cannot decode image")
    assert result.failed == 3


def test_a_photo_replaced_between_decoding_and_blending_fails_as_one_input(photos, tmp_path):
    from segcli.vocabulary.labels import parse_labels

    out = tmp_path / "out"
    out.mkdir()
    plan = host.HostPlan(parse_labels(TINY_LABELS), ("mask", "overlay"), 0.5, 64, 10**8, out, out.resolve())
    from segcli.inputs.sources import collect_sources

    source = next(s for s in collect_sources([str(photos)]).sources if s.rel.name == "cat")
    got = host.decode(source.path, plan)
    logits = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    job = host.FinishJob(source, np.array([0, 1]), logits, (8.0, 8.0), got.full_hw, 0.0, got.stamp)
    assert host.finish(job, plan)["status"] == "ok"
    Image.open(SAMPLES / "coffee.jpg").convert("RGB").resize(got.full_hw[::-1]).save(source.path, quality=90)
    with pytest.raises(host.InputFailure, match="the file changed while it was being processed"):
        host.finish(job, plan)
    source.path.unlink()
    with pytest.raises(host.InputFailure, match="the file went away while it was being processed"):
        host.finish(job, plan)


def test_an_unreadable_folder_is_a_failed_input_not_a_silent_skip(photos, tmp_path, tiny_checkpoint, monkeypatch):
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "sub":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = cli(*predict_args(photos, tmp_path / "out", tiny_checkpoint))
    assert result.exit_code == 1
    assert f"error: {photos / 'sub'}: cannot read this folder: Permission denied" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"inputs": 3, "ok": 2, "failed": 1, "reused": 0, "not_done": 0}


# --- training's folder ----------------------------------------------------------------------------

TRAIN = ["--data", "synthetic", "--model", "lseg_tiny", "--crop", "64", "--workers", "0", "--batch-size", "4",
         "--eval-every", "4", "--save-every", "2", "-q"]


def test_train_disk_full_keeps_the_last_state_and_resumes(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from segcli.models import checkpoint

    run = tmp_path / "run"
    real, saves = checkpoint.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        saves["n"] += 1
        if saves["n"] == 2:  # the second save meets a full disk, halfway through
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    result = cli("train", *TRAIN, "--steps", "6", "-o", str(run))
    assert result.exit_code == 2
    line = one_error_line(result.output)
    assert f"stopped at step 4: cannot write to {run}: No space left on device; the state saved at step 2 is intact" in line
    assert not temp_files(run) and not (run / ".segcli").exists()
    assert json.loads(load_file_metadata(run / "state.safetensors")["trainer"])["step"] == 2
    monkeypatch.setattr(checkpoint, "save_file", real)
    result = cli("train", "--resume", str(run), "-q")
    assert result.exit_code == 0, result.output
    assert load_file(str(run / "last.safetensors"))  # finished: the checkpoints are whole
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval" in r] == [4, 6]


def load_file_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_two_resumes_of_one_training_run_are_refused(tmp_path, live_pid):
    run = tmp_path / "run"
    assert cli("train", *TRAIN, "--steps", "2", "-o", str(run)).exit_code == 0
    write_lock(run, live_pid, what="train")
    result = cli("train", "--resume", str(run), "-q")
    assert result.exit_code == 2
    assert f"{run} is in use by another segcli run (train, pid {live_pid}" in one_error_line(result.output)
